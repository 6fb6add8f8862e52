"""Question files into samples, prompted as LLaVA's eval modules prompt them (no model)."""
import base64
import io
import json

import pytest

from eval.benchmarks import SINGLE_PRED, SINGLE_PRED_CN, get_benchmark
from eval.common import EvalError
from eval.questions import load_samples


def test_scienceqa_img_only_and_prompt_fields(tmp_path):
    base = tmp_path / "scienceqa"
    (base / "images" / "test").mkdir(parents=True)
    rows = [{"id": "1", "image": "1/image.png", "conversations": [{"from": "human", "value": "<image>\nWhich is it?\nA. x\nB. y"}]},
            {"id": "2", "conversations": [{"from": "human", "value": "Text only?\nA. x\nB. y"}]}]
    (base / "llava_test_CQM-A.json").write_text(json.dumps(rows))
    samples = load_samples(get_benchmark("scienceqa"), tmp_path)
    assert [s.question_id for s in samples] == ["1"]  # ScienceQA-IMG: text-only questions are not run
    s = samples[0]
    # model_vqa_science.py: qs without <image>, + single-pred prompt; prompt field starts with "<image>\n"
    assert s.question == "Which is it?\nA. x\nB. y\n" + SINGLE_PRED
    assert s.prompt == "<image>\nWhich is it?\nA. x\nB. y\n" + SINGLE_PRED
    assert s.image_path == base / "images" / "test" / "1" / "image.png"


def test_mmbench_options_hint_and_language(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (1, 2, 3)).save(buf, format="PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
    rows = [f"7\tWhat?\tA hint\tcat\tdog\tnan\t\tA\tc\t{img}\n", f"8\tWho?\tnan\tme\tyou\tthem\tus\tB\tc\t{img}\n"]
    for folder, name in (("mmbench", "mmbench_dev_20230712.tsv"), ("mmbench_cn", "mmbench_dev_cn_20231003.tsv")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text(header + "".join(rows))
    en = load_samples(get_benchmark("mmbench"), tmp_path)
    assert en[0].question_id == 7 and en[0].prompt == "A hint\nWhat?\nA. cat\nB. dog"
    assert en[0].question == en[0].prompt + "\n" + SINGLE_PRED
    assert en[0].extra == {"round_id": 0, "options": ["cat", "dog"], "option_char": ["A", "B"]}
    assert en[1].prompt == "Who?\nA. me\nB. you\nC. them\nD. us"
    assert en[1].load_image().size == (30, 20)
    cn = load_samples(get_benchmark("mmbench_cn"), tmp_path)
    assert cn[0].question.endswith("\n" + SINGLE_PRED_CN)


def test_duplicate_question_ids_are_refused(tmp_path):
    (tmp_path / "pope" / "val2014").mkdir(parents=True)
    q = {"question_id": 3, "image": "a.jpg", "text": "Is there a cat?"}
    (tmp_path / "pope" / "llava_pope_test.jsonl").write_text(json.dumps(q) + "\n" + json.dumps(q) + "\n")
    with pytest.raises(EvalError, match="question_id 3 twice"):
        load_samples(get_benchmark("pope"), tmp_path)


def test_missing_image_is_named(tmp_path):
    (tmp_path / "pope" / "val2014").mkdir(parents=True)
    (tmp_path / "pope" / "llava_pope_test.jsonl").write_text(
        json.dumps({"question_id": 1, "image": "gone.jpg", "text": "q"}) + "\n")
    s = load_samples(get_benchmark("pope"), tmp_path)[0]
    with pytest.raises(EvalError, match="gone.jpg of question 1 does not exist"):
        s.load_image()
