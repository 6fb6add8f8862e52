"""Bias analysis tools: figures from recorded runs, the GGUF → transformers loader and the SmolLM2 study.

    python -m analysis figures REC.npz --out DIR [--mode full --trend calibrated:T.json --keep 192 --method himap]
    python -m analysis study [--out outputs/analysis] [--quick]
    python -m analysis convert [--gguf FILE] [--force]

Needs numpy, torch, matplotlib; the study and converter also need transformers and gguf (envs/analysis.txt).
"""
