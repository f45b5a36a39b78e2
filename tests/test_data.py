"""Data: the loaders' formats and skip policy, image decoding, key steps from a reference path, batch order."""
import json
import logging

import pytest
from PIL import Image

from training import data

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
            rl(key_steps={"Steps": [["x = 3"], {"x": 3}]}),  # 8 bad key_steps (a group that is a dict)
            rl(key_steps=None),                              # 9 missing key_steps
            "", rl(image=str(folder / "imgs" / "b.png"))]    # 10 blank line; 11 absolute path
    stats = {}
    with caplog.at_level(logging.WARNING, logger="data"):
        out = data.load_rl_data(write_jsonl(folder / "rl.jsonl", rows), stats=stats)
    assert stats == {"kept": 4, "skipped": {"malformed JSON": 1, "missing field": 1, "missing image": 1,
                                             "bad key_steps": 2, "missing key_steps": 1},
                     "relocated_images": 0, "derived_key_steps": 0}
    assert [r["id"] for r in out] == ["s1", "rl.jsonl:2", "rl.jsonl:3", "rl.jsonl:11"]
    assert all(r["key_steps"] == GOOD_STEPS for r in out)
    assert out[0]["image_path"] == str(folder / "a.png")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 5
    assert any("bad key_steps (lines 7, 8;" in w for w in warnings)
    assert any("missing image (lines 6;" in w for w in warnings)


def test_rl_loader_reads_a_json_list_with_an_image_root(folder):
    path = folder / "rl.json"
    path.write_text(json.dumps([rl(image="b.png"), rl(image="a.png")]))
    stats = {}
    out = data.load_rl_data(path, image_root=folder / "imgs", stats=stats)
    assert [r["image_path"] for r in out] == [str(folder / "imgs" / "b.png")]
    assert stats["skipped"] == {"missing image": 1}


@pytest.mark.parametrize("key_steps", [{"Steps": [["x = 3"], []]}, {"Steps": [["x = 3"], None]},
                                       [["x = 3"], ["", " "]], '{"Steps": [["x = 3"], null]}'])
def test_empty_or_null_key_step_groups_are_kept_as_never_found(folder, key_steps):
    out = data.load_rl_data(write_jsonl(folder / "rl.jsonl", [rl(key_steps=key_steps)]))
    assert out[0]["key_steps"] == {"Steps": [["x = 3"], []]}


@pytest.mark.parametrize("image, root, found", [
    ("/elsewhere/data/imgs/b.png", ".", "imgs/b.png"),     # the tail under the root
    ("/elsewhere/pics/b.png", "imgs", "imgs/b.png"),        # the file name under the root
    ("/elsewhere/imgs/c.png", ".", "imgs/c.png"),           # longest tail first, not ./c.png
    ("data/imgs/b.png", ".", "imgs/b.png"),                 # a relative path, likewise
])
def test_image_path_not_found_is_retried_as_its_tail_under_the_root(folder, image, root, found):
    for where in (folder / "c.png", folder / "imgs" / "c.png"):
        Image.new("RGB", (28, 28), "green").save(where)
    stats = {}
    out = data.load_rl_data(write_jsonl(folder / "rl.jsonl", [rl(image=image)]), folder / root, stats=stats)
    assert out[0]["image_path"] == str(folder / found)
    assert stats["relocated_images"] == 1


def test_a_numeric_solution_or_problem_is_its_text(folder):
    rows = [rl(solution=2), rl(solution=2.5, problem=7), rl(solution=True)]
    stats = {}
    out = data.load_rl_data(write_jsonl(folder / "rl.jsonl", rows), stats=stats)
    assert [(r["problem"], r["solution"]) for r in out] == [("What is x?", "2"), ("7", "2.5")]
    assert stats["skipped"] == {"missing field": 1}                     # a boolean is no answer
    sft = data.load_sft_data(write_jsonl(folder / "sft.jsonl", [rl(solution=2), mulberry(answer=3)]))
    assert [r["response"] for r in sft] == ["2", "3"]


def test_an_image_url_is_not_fetched_and_relocated_only_under_image_root(folder, caplog):
    url = "https://example.com/data/imgs/b.png"
    path = write_jsonl(folder / "rl.jsonl", [rl(image=url), rl()])
    stats = {}
    assert len(data.load_rl_data(path, stats=stats)) == 1
    assert stats["skipped"] == {"image is a URL": 1} and stats["relocated_images"] == 0
    with pytest.raises(ValueError, match=r"no usable records \(1 image is a URL\); download the images"):
        data.load_rl_data(write_jsonl(folder / "one.jsonl", [rl(image=url)]))
    with caplog.at_level(logging.WARNING):
        out = data.load_rl_data(path, image_root=folder, stats=stats)
    assert out[0]["image_path"] == str(folder / "imgs" / "b.png") and stats["relocated_images"] == 1
    assert any("1 image URL(s) not fetched" in r.getMessage() for r in caplog.records)
    stats = {}
    data.load_rl_data(write_jsonl(folder / "two.jsonl", [rl(image="https://example.com/nope.png"), rl()]),
                      image_root=folder, stats=stats)
    assert stats["skipped"] == {"image is a URL": 1}


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_unreadable_image_is_a_counted_skip_and_alone_fails_at_load_time(folder, content):
    (folder / "bad.png").write_bytes(content)
    path = write_jsonl(folder / "rl.jsonl", [rl(image="bad.png"), rl()])
    stats = {}
    assert len(data.load_rl_data(path, stats=stats)) == 1
    assert stats["skipped"] == {"unreadable image": 1}
    with pytest.raises(ValueError, match=r"no usable records \(1 unreadable image\)"):
        data.load_rl_data(write_jsonl(folder / "one.jsonl", [rl(image="bad.png")]))


def mulberry(question="<image>What is x?", answer="### Step 1:\nx = 3", images=("a.png",),
             roles=("user", "assistant")):
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, (question, answer))],
            "images": list(images)}


@pytest.mark.parametrize("loader, rows, advice", [
    (data.load_rl_data, [mulberry()], r"\(1 SFT record\); this is warm-up data: run it with --stage sft$"),
    (data.load_rl_data, [rl(key_steps=None)], r"\(1 missing key_steps\); pass --derive_key_steps to"),
    (data.load_sft_data, [rl(image="nope.png")], r"\(1 missing image\); image paths resolve against .*--image_root"),
])
def test_file_for_the_wrong_stage_fails_with_one_line_saying_what_to_do(folder, loader, rows, advice):
    with pytest.raises(ValueError, match=advice) as e:
        loader(write_jsonl(folder / "x.jsonl", rows))
    assert "\n" not in str(e.value)


def test_derive_key_steps_fills_only_missing_ones_and_skips_what_has_none(folder):
    rows = [rl(),                                                                   # given: kept as is
            rl(key_steps=None, solution="### Step 1:\nAE = 2, so x = 3.\n\n### The final answer is: 3"),
            rl(key_steps=[], solution="### Step 1:\nThe red bar is taller.\n\n### The final answer is: yes")]
    stats = {}
    out = data.load_rl_data(write_jsonl(folder / "rl.jsonl", rows), stats=stats, derive_key_steps=True)
    assert out[0]["key_steps"] == GOOD_STEPS
    assert [g[0] for g in out[1]["key_steps"]["Steps"]] == ["AE = 2", "x = 3"]
    assert stats["derived_key_steps"] == 1
    assert stats["skipped"] == {"no derivable key_steps": 1}


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


def test_sft_loader_reads_mulberry_messages_and_rl_records(folder):
    rows = [mulberry(), rl(image="imgs/b.png", solution="### Step 1:\nx = 3\n\n### The final answer is: 3"),
            mulberry(images=("a.png", "a.png")),           # 3 two images
            mulberry(roles=("user",)),                     # 4 no assistant turn
            mulberry(images=("nope.png",)),                # 5 missing image
            mulberry(question="<image>x?<image>"),         # 6 two tags, one image
            mulberry(images=())]                           # 7 no image
    stats = {}
    out = data.load_sft_data(write_jsonl(folder / "sft.jsonl", rows), stats=stats)
    assert out[0] == {"id": "sft.jsonl:1", "image_path": str(folder / "a.png"),
                      "problem": "What is x?", "response": "### Step 1:\nx = 3"}
    assert out[1]["response"].endswith("### The final answer is: 3")
    assert stats["skipped"] == {"image tags do not match images": 2, "missing field": 2, "missing image": 1}


def test_several_images_per_sample_stand_where_their_tags_are_written(folder):
    """SFT messages + images, ShareGPT and RL records with two images; a tag count that does not match
    the images, or a tag in the answer, is a counted skip that says so; one missing image skips its record."""
    two = ("a.png", "imgs/b.png")
    rows = [mulberry(question="Compare <image> with <image>.", images=two),
            {**sharegpt(("human", "<image> then <image>?"), ("gpt", "x = 3")), "images": list(two)},
            rl(image=list(two), problem="<image> left, <image> right: x?"),
            mulberry(question="<image> and <image> and <image>", images=two),       # 3 tags, 2 images
            mulberry(question="<image>", answer="see <image>", images=two),         # a tag in the answer
            mulberry(question="<image><image>", images=("a.png", "nope.png"))]
    stats = {}
    out = data.load_sft_data(write_jsonl(folder / "sft.jsonl", rows), stats=stats)
    paths = [str(folder / "a.png"), str(folder / "imgs" / "b.png")]
    assert [(r["problem"], r["image_path"]) for r in out] == [("Compare <image> with <image>.", paths),
                                                              ("<image> then <image>?", paths),
                                                              ("<image> left, <image> right: x?", paths)]
    assert stats["skipped"] == {"image tags do not match images": 2, "missing image": 1}
    rl_out = data.load_rl_data(write_jsonl(folder / "rl.jsonl", [rl(image=list(two), problem="<image> vs <image>"),
                                                                 rl(image=list(two))]), stats=stats)
    assert [r["image_path"] for r in rl_out] == [paths] and stats["skipped"] == {"image tags do not match images": 1}


def sharegpt(*turns):
    return {"conversations": [{"from": f, "value": v} for f, v in turns], "images": ["a.png"]}


@pytest.mark.parametrize("record, system", [
    ({**mulberry(), "images": "a.png"}, 0),                                           # Mulberry's own: a plain path
    ({**mulberry(), "messages": [{"role": "system", "content": "Be brief."}] + mulberry()["messages"]}, 1),
    (sharegpt(("human", "<image>What is x?"), ("gpt", "### Step 1:\nx = 3")), 0),      # LLaMA-Factory ShareGPT
    (sharegpt(("system", "Be brief."), ("human", "<image>What is x?"), ("gpt", "### Step 1:\nx = 3")), 1),
])
def test_sft_loader_accepts_every_llama_factory_form_and_ignores_a_system_turn(folder, record, system):
    stats = {}
    out = data.load_sft_data(write_jsonl(folder / "sft.jsonl", [record]), stats=stats)
    assert out == [{"id": "sft.jsonl:1", "image_path": str(folder / "a.png"), "problem": "What is x?",
                    "response": "### Step 1:\nx = 3"}]
    assert stats["system_turns_ignored"] == system


# The sentence Mulberry's data construction inserts (REFLECTION_PROMPT), the paper's wording, variants.
REFLECTIONS = ["I think I have made a mistake. Let me rethink it.", "I made an error in Step 2.",
               "The previous reasoning step is wrong and let's rethink it again.", "We've made a mistake above.",
               "The last step was incorrect.", "Rethinking the angle at B:"]
# Ordinary reasoning, including Mulberry's own section header.
NOT_REFLECTIONS = ["### Let's think step by step.", "Option B is wrong because AB < BC.",
                   "A common mistake is to add the angles.", "The previous step gives x = 3.",
                   "Choice C is incorrect.", "We think of the error bars as the range.", "We made a table."]


@pytest.mark.parametrize("sentence, reflective",
                         [(s, True) for s in REFLECTIONS] + [(s, False) for s in NOT_REFLECTIONS])
def test_reflective_pattern_finds_self_correction_not_ordinary_reasoning(sentence, reflective):
    assert bool(data.REFLECTIVE.search(f"### Step 1:\nx = 2\n\n{sentence}\n\n### Step 2:\nx = 3")) == reflective


def test_sft_loader_drops_reflective_samples_only_on_request(folder):
    reflective = ("### Step 1:\nx = 2\n\n### Step 2:\nx = 5\n\nI think I have made a mistake. Let me rethink it."
                  "\n\n### Step 2:\nx = 3")
    path = write_jsonl(folder / "sft.jsonl", [mulberry(), mulberry(answer=reflective)])
    assert len(data.load_sft_data(path)) == 2
    stats = {}
    assert len(data.load_sft_data(path, stats=stats, drop_reflective=True)) == 1
    assert stats["skipped"] == {"reflective (dropped on request)": 1}


# ---------------------------------------------------------------------------- what a real file may hold
def gradient(mode, top):
    """A 64x64 left-to-right ramp from 0 to `top` in `mode`."""
    import numpy as np
    ramp = np.tile(np.linspace(0, top, 64), (64, 1))
    return Image.fromarray(ramp.astype({"I;16": np.uint16, "F": np.float32}[mode]))


@pytest.mark.parametrize("mode, top, suffix", [("I;16", 65535, "png"), ("I;16", 4000, "png"), ("F", 1.0, "tiff"),
                                               ("F", 900.0, "tiff")])
def test_high_bit_depth_images_keep_their_range_instead_of_clipping_to_white(tmp_path, mode, top, suffix):
    gradient(mode, top).save(tmp_path / f"x.{suffix}")
    row = [data.load_image(str(tmp_path / f"x.{suffix}")).getpixel((x, 32))[0] for x in range(64)]
    assert row[0] == 0 and row[-1] == 255 and 120 <= row[32] <= 135      # the ramp survives, end to end
    assert row == sorted(row)


@pytest.mark.parametrize("size", [(4000, 2), (2, 600)])
def test_a_very_thin_image_is_refused_where_images_are_opened(size):
    with pytest.raises(ValueError, match="aspect ratio 200 or more"):
        data.load_image(Image.new("RGB", size))


def test_a_decompression_bomb_is_a_value_error_not_a_pil_traceback(tmp_path, monkeypatch):
    import io
    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)       # PIL's limit, scaled down: 300x300 is 90 times over
    with pytest.raises(ValueError, match="exceeds limit of 2000 pixels"):
        data.load_image(io.BytesIO(buf.getvalue()))


def test_thin_and_oversized_images_are_counted_skips_at_load_time(folder, monkeypatch):
    Image.new("RGB", (4000, 2)).save(folder / "thin.png")
    Image.new("RGB", (100, 100)).save(folder / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    stats = {}
    out = data.load_rl_data(write_jsonl(folder / "rl.jsonl", [rl(image="thin.png"), rl(image="big.png"), rl()]),
                            stats=stats)
    assert len(out) == 1 and stats["skipped"] == {"unusable image": 2}


def test_two_paths_relocating_to_one_file_are_skipped_as_ambiguous(folder, caplog):
    Image.new("RGB", (28, 28), "green").save(folder / "imgs" / "good.png")
    rows = [rl(image="/data/setA/good.png"), rl(image="/data/setB/good.png"), rl(image="/data/setA/b.png"),
            rl(image="/data/setA/b.png")]                    # one name twice: one image, not ambiguous
    stats = {}
    with caplog.at_level(logging.WARNING, logger="data"):
        out = data.load_rl_data(write_jsonl(folder / "rl.jsonl", rows), folder / "imgs", stats=stats)
    assert stats["skipped"] == {"ambiguous image path": 2}
    assert [r["image_path"] for r in out] == [str(folder / "imgs" / "b.png")] * 2 and stats["relocated_images"] == 2
    lines = [r.getMessage() for r in caplog.records]
    assert any("ambiguous image path (lines 1, 2;" in m for m in lines)
    assert any("2 image path(s) not found as given were relocated" in m for m in lines)


def test_a_relocation_that_collides_with_a_path_given_as_is_is_ambiguous(folder):
    stats = {}
    out = data.load_rl_data(write_jsonl(folder / "rl.jsonl", [rl(image="a.png"), rl(image="/elsewhere/a.png")]),
                            stats=stats)
    assert [r["image_path"] for r in out] == [str(folder / "a.png")] and stats["skipped"] == {"ambiguous image path": 1}


@pytest.mark.parametrize("form", ["json", "jsonl"])
def test_a_byte_order_mark_is_ignored(folder, form):
    rows = [rl(id="first"), rl(id="second")]
    text = json.dumps(rows) if form == "json" else "".join(json.dumps(r) + "\n" for r in rows)
    (folder / f"rl.{form}").write_text(text, encoding="utf-8-sig")
    assert [r["id"] for r in data.load_rl_data(folder / f"rl.{form}")] == ["first", "second"]


@pytest.mark.parametrize("content, message", [
    (json.dumps(rl(), indent=2), r"one JSON object over \d+ lines \(keys image_path, problem"),
    (json.dumps({"version": 1, "data": [rl(), rl()]}), r"one JSON object whose 'data' holds 2 records"),
])
def test_a_file_that_is_one_json_object_says_what_it_is_and_what_shape_is_expected(folder, content, message):
    (folder / "rl.json").write_text(content)
    with pytest.raises(ValueError, match=message + r".*expected a JSON list of records \(\[\{\.\.\.\}, \.\.\.\]\) or JSONL"):
        data.load_rl_data(folder / "rl.json")


def test_a_one_line_jsonl_file_is_still_one_record(folder):
    assert len(data.load_rl_data(write_jsonl(folder / "rl.jsonl", [rl()]))) == 1


def test_evaluation_reads_predictions_with_a_byte_order_mark(tmp_path):
    from collections import Counter
    import evaluate
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prediction": "1"}\n{"id": "b", "prediction": "2"}\n', encoding="utf-8-sig")
    counts = Counter()
    assert evaluate.read_predictions(path, counts)[0] == {"a": "1", "b": "2"} and not +counts    # nothing counted


def test_evaluation_refuses_a_thin_image_or_side_by_side_strip_as_one_record():
    import evaluate
    with pytest.raises(ValueError, match="aspect ratio"):
        evaluate.open_image([Image.new("RGB", (4000, 2))])
    with pytest.raises(ValueError, match="aspect ratio"):       # 250 images of 28x28 pasted side by side
        evaluate.open_image([Image.new("RGB", (28, 28))] * 250)
