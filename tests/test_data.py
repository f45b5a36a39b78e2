"""Data: the loaders' skip/count policy, image decoding, key steps from a reference path, batch order."""
import json
import logging

import pytest
from PIL import Image

import data

# ---------------------------------------------------------------------------- images
@pytest.mark.parametrize("mode, fill", [("RGBA", (0, 0, 0, 0)), ("LA", (0, 0)), ("P", 0)])
def test_transparent_background_becomes_white_not_black(tmp_path, mode, fill):
    image = Image.new(mode, (40, 40), fill)
    if mode == "P":                                   # palette entry 0 marked transparent, 1 opaque black
        image.putpalette([0, 0, 0] * 256)
        image.info["transparency"] = 0
        image.putpixel((20, 20), 1)
    else:
        image.putpixel((20, 20), (0, 255) if mode == "LA" else (0, 0, 0, 255))   # one opaque black line pixel
    image.save(tmp_path / "diagram.png", **({"transparency": 0} if mode == "P" else {}))
    rgb = data.load_image(str(tmp_path / "diagram.png"), max_pixels=10_000)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)   # transparent background
    assert rgb.getpixel((20, 20)) == (0, 0, 0)       # the drawing stays


# ---------------------------------------------------------------------------- loaders
GOOD_STEPS = {"Steps": [["AE = 2", "AE is 2"], ["x = 3"]]}


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (28, 28), "red").save(tmp_path / "a.png")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (28, 28), "blue").save(tmp_path / "imgs" / "b.png")
    return tmp_path


def rl(image="a.png", **over):
    rec = {"image_path": image, "problem": "What is x?", "solution": "### The final answer is: 3",
           "key_steps": GOOD_STEPS}
    return {k: v for k, v in {**rec, **over}.items() if v is not None}


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_rl_loader_keeps_good_records_and_counts_each_bad_one(folder, caplog):
    rows = [rl(id="s1"),                                     # 1 dict key_steps
            rl(key_steps=GOOD_STEPS["Steps"]),               # 2 bare list
            rl(key_steps=json.dumps(GOOD_STEPS)),            # 3 JSON string of the dict
            '{"image_path": "a.png", "problem": ',           # 4 malformed JSON
            rl(problem=None),                                # 5 missing field
            rl(image="nope.png"),                            # 6 missing image
            rl(key_steps="not json"),                        # 7 bad key_steps
            rl(key_steps={"Steps": [["x = 3"], []]}),        # 8 bad key_steps (empty group)
            "", rl(image=str(folder / "imgs" / "b.png"))]    # 9 blank line; 10 absolute path
    stats = {}
    with caplog.at_level(logging.WARNING, logger="data"):
        out = data.load_rl_data(write_jsonl(folder / "rl.jsonl", rows), stats=stats)
    assert stats == {"kept": 4, "skipped": {"malformed JSON": 1, "missing field": 1,
                                             "missing image": 1, "bad key_steps": 2}}
    assert [r["id"] for r in out] == ["s1", "rl.jsonl:2", "rl.jsonl:3", "rl.jsonl:10"]
    assert all(r["key_steps"] == GOOD_STEPS for r in out)
    assert out[0]["image_path"] == str(folder / "a.png")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 4
    assert any("bad key_steps (lines 7, 8;" in w for w in warnings)
    assert any("missing image (lines 6;" in w for w in warnings)


def test_rl_loader_reads_a_json_list_with_an_image_root(folder):
    path = folder / "rl.json"
    path.write_text(json.dumps([rl(image="b.png"), rl(image="a.png")]))
    stats = {}
    out = data.load_rl_data(path, image_root=folder / "imgs", stats=stats)
    assert [r["image_path"] for r in out] == [str(folder / "imgs" / "b.png")]
    assert stats == {"kept": 1, "skipped": {"missing image": 1}}


@pytest.mark.parametrize("loader", [data.load_rl_data, data.load_sft_data])
def test_loader_raises_when_nothing_is_usable(folder, loader):
    path = write_jsonl(folder / "bad.jsonl", ["{oops", rl(image="nope.png")])
    with pytest.raises(ValueError, match=r"bad.jsonl: no usable records \(1 malformed JSON, 1 missing image\)"):
        loader(path)


@pytest.mark.parametrize("content, error", [("[{", ValueError), (None, FileNotFoundError)])
def test_unreadable_file_raises(folder, content, error):
    path = folder / "x.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match="x.json"):
        data.load_rl_data(path)


def mulberry(question="<image>What is x?", answer="### Step 1:\nx = 3", images=("a.png",),
             roles=("user", "assistant")):
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, (question, answer))],
            "images": list(images)}


def test_sft_loader_reads_mulberry_messages_and_rl_records(folder):
    rows = [mulberry(), rl(image="imgs/b.png", solution="### Step 1:\nx = 3\n\n### The final answer is: 3"),
            mulberry(images=("a.png", "a.png")),           # 3 two images
            mulberry(roles=("user",)),                     # 4 no assistant turn
            mulberry(images=("nope.png",))]                # 5 missing image
    stats = {}
    out = data.load_sft_data(write_jsonl(folder / "sft.jsonl", rows), stats=stats)
    assert out[0] == {"id": "sft.jsonl:1", "image_path": str(folder / "a.png"),
                      "problem": "What is x?", "response": "### Step 1:\nx = 3"}
    assert out[1]["response"].endswith("### The final answer is: 3")
    assert stats == {"kept": 2, "skipped": {"missing field": 2, "missing image": 1}}


def test_sft_loader_drops_reflective_samples_only_on_request(folder):
    reflective = ("### Step 1:\nx = 2\n\nThe previous reasoning step is wrong and let's rethink it again."
                  "\n\n### Step 2:\nx = 3")
    path = write_jsonl(folder / "sft.jsonl", [mulberry(), mulberry(answer=reflective)])
    assert len(data.load_sft_data(path)) == 2
    stats = {}
    assert len(data.load_sft_data(path, stats=stats, drop_reflective=True)) == 1
    assert stats["skipped"] == {"reflective (dropped on request)": 1}
