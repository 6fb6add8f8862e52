"""The study model: LLaVA-1.5's architecture on the real SmolLM2-135M-Instruct LLM, trained here on grounded
synthetic VQA, so that the paper's mechanism can be measured on real (not random) LLM weights."""
