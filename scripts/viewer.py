"""scripts/viewer.py: one self-contained HTML page that shows why each completion got its reward.

    python -m scripts.viewer out/                       # a training run: out/rollouts.jsonl + out/metrics.jsonl -> out/viewer.html
    python -m scripts.viewer eval/mathvista_x.jsonl     # evaluate.py predictions -> eval/mathvista_x.html (wrong answers first)

A run's page: per logged step (the selector), each prompt with its image (a thumbnail made now from the
image's path), question, ground truth and key-step groups, then its M completions side by side, split into
their sections, the matched key-step alternatives highlighted in the text, with the answer verdict, StepRAR,
StepRVR and the validity rule that failed (rewards.validity_failure), the total reward, the group advantage,
the length and whether it was cut at --max_new_tokens. Filters: groups whose rewards are all equal (no policy
gradient), wrong answers, invalid format. On top, the run's curves from metrics.jsonl as inline SVG.
A predictions page reads the benchmark named in the file's first line (or --bench/--data), scores it as
evaluate.py does (benchmarks/harness.py) and shows each record's extracted answer against the gold one.
No server and no JavaScript library: a few lines of plain JavaScript run the selector and the filters.
"""
import argparse
import base64
import html
import io
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image

import rewards
from benchmarks import harness
from toy import task as toy

THUMB = 160          # px, the longer side of a thumbnail
RULES = {"missing_section": "a section is missing, empty or repeated", "step_numbering": "steps not numbered 1..n",
         "answer_not_last": "the answer is not after the last step", "wrong_order": "sections out of order"}
CURVES = [("sft", "loss", "warm-up loss"), ("rl", "reward", "reward"), ("rl", "accuracy", "sampled accuracy"),
          ("rl", "step_rvr", "StepRVR"), ("rl", "key_step_match", "key-step match k"), ("rl", "kl", "KL"),
          ("rl", "completion_len", "completion length")]
_HEADER = re.compile(r"^[ \t]*#{2,4}[^\n]*", re.M)


# ----------------------------------------------------------------------------- pieces of the page
def esc(x):
    return html.escape(str(x), quote=True)


class Thumbs:
    """Each image once, as a CSS class holding a small base64 JPEG; unreadable images become a grey box."""

    def __init__(self):
        self.css, self.names, self.toy = [], {}, {}

    def of(self, key, load):
        if key not in self.names:
            try:
                image = load().convert("RGB")
                image.thumbnail((THUMB, THUMB))
                buf = io.BytesIO()
                image.save(buf, "JPEG", quality=75)
                name = f"i{len(self.names)}"
                self.css.append(f".{name}{{background-image:url(data:image/jpeg;base64,"
                                f"{base64.b64encode(buf.getvalue()).decode()});width:{image.width}px;height:{image.height}px}}")
            except (OSError, ValueError, KeyError, IndexError):
                name = "noimage"
            self.names[key] = name
        return f'<div class="thumb {self.names[key]}" title="{esc(key)}"></div>'

    def toy_image(self, sid):
        """A toy sample's image, made again from its id (toy-<split>-d<level>-s<seed>-<i>): toy images live in memory."""
        split, level, seed, i = re.fullmatch(r"toy-(\w+)-d(\d+)-s(-?\d+)-(\d+)", sid).groups()
        key = (split, int(level), int(seed))
        if len(self.toy.get(key, [])) <= int(i):
            self.toy[key] = toy.dataset(split, n=int(i) + 1, seed=int(seed), difficulty=int(level))
        return self.toy[key][int(i)]["image"]

    def for_row(self, row):
        if row.get("image"):                           # a path, or the paths of several images in prompt order
            paths = [row["image"]] if isinstance(row["image"], str) else row["image"]
            return "".join(self.of(p, lambda p=p: Image.open(p)) for p in paths)
        if str(row.get("id", "")).startswith("toy-"):
            return self.of(row["id"], lambda: self.toy_image(row["id"]))
        return '<div class="thumb noimage"></div>'


def marked(text, spans):
    """The completion split into its sections (a box per '### ...' header), key-step spans as <mark>s."""
    cuts = [m.start() for m in _HEADER.finditer(text)]
    bounds = [0] + cuts + [len(text)] if not cuts or cuts[0] else cuts + [len(text)]
    marks = sorted((a, b, g) for g, s in enumerate(spans) if s for a, b in [s])
    out = []
    for start, end in zip(bounds, bounds[1:]):
        if start == end:
            continue
        head = _HEADER.match(text, start)
        label = head.group().strip("# \t") if head else ""
        kind = ("s-step" if re.match(r"step\s*\d", label, re.I) else "s-answer" if label.lower().startswith("the final")
                else "s-head")
        body, at = [], start
        for a, b, g in marks:
            a, b = max(a, start), min(b, end)
            if a >= b or a < at:
                continue
            body += [esc(text[at:a]), f'<mark class="k{g % 6}" data-group="{g + 1}">{esc(text[a:b])}</mark>']
            at = b
        body.append(esc(text[at:end]))
        out.append(f'<div class="sec {kind}">{"".join(body)}</div>')
    return "".join(out) or '<div class="sec empty">(empty)</div>'


def verdict(row):
    if row.get("answer") is None:
        return "none", "no answer"
    return ("right", "answer right") if row.get("correct") else ("wrong", "answer wrong")


def completion_card(row):
    cls, word = verdict(row)
    rule = row.get("invalid")
    groups = row.get("key_steps") or []
    matched = row.get("matched") or [None] * len(groups)
    chips = "".join(f'<span class="chip {"hit k%d" % (g % 6) if m else "miss"}" title="{esc(m or "not found")}">'
                    f'{g + 1}{"✓" if m else "✗"}</span>' for g, m in enumerate(matched))
    missing = sum(m is None for m in matched)
    facts = [f'<span class="verdict {cls}">{word}</span>',
             f'<span class="answer">answer: {esc(row["answer"])}</span>' if row.get("answer") is not None else "",
             f'<span class="rar">StepRAR {row.get("step_rar", 0):.3g}</span>',
             f'<span class="rvr">StepRVR {row.get("step_rvr", 0):.3g}</span>',
             f'<span class="rule {"bad" if rule else "ok"}">{esc(RULES.get(rule, rule)) if rule else "format valid"}</span>',
             f'<span class="keys">key steps {len(matched) - missing}/{len(matched)}'
             f'{f" ({missing} missing)" if missing else ""} {chips}</span>',
             f'<span class="total">reward {row.get("total", 0):.3g}</span>',
             f'<span class="adv">advantage {row.get("advantage", 0):+.3f}</span>',
             f'<span class="len">{row.get("length", "?")} tokens{" · truncated" if row.get("truncated") else ""}</span>']
    data = f'data-correct="{int(bool(row.get("correct")))}" data-valid="{int(rule is None)}"'
    return (f'<div class="completion {cls}" {data}><div class="facts">{"".join(facts)}</div>'
            f'{marked(row.get("completion") or "", row.get("spans") or [])}</div>')


def key_step_list(groups):
    items = "".join(f'<li class="k{g % 6}">{" | ".join(esc(a) for a in alts[:3])}'
                    f'{f" (+{len(alts) - 3})" if len(alts) > 3 else ""}</li>' for g, alts in enumerate(groups))
    return f'<ol class="keysteps">{items}</ol>' if groups else '<p class="muted">no key steps</p>'


def prompt_block(rows, thumbs):
    first, totals = rows[0], [r.get("total") for r in rows]
    equal = int(len(set(totals)) <= 1)
    return (f'<div class="group" data-equal="{equal}"><div class="prompt">{thumbs.for_row(first)}<div>'
            f'<p class="id">{esc(first.get("id"))}{" · all rewards equal: no gradient" if equal else ""}</p>'
            f'<p class="question">{esc(first.get("question") or "")}</p>'
            f'<p class="gold">ground truth: <b>{esc(first.get("gold"))}</b></p>{key_step_list(first.get("key_steps") or [])}'
            f'</div></div><div class="completions">{"".join(map(completion_card, rows))}</div></div>')


# ----------------------------------------------------------------------------- curves
def svg_curve(title, series, width=230, height=110):
    """A small inline SVG line chart of {label: [(x, y)]}."""
    points = [p for s in series.values() for p in s]
    if not points:
        return ""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda x: 30 + (width - 40) * (x - x0) / ((x1 - x0) or 1)          # noqa: E731
    sy = lambda y: height - 18 - (height - 34) * (y - y0) / ((y1 - y0) or 1)  # noqa: E731
    lines = []
    for (label, s), colour in zip(series.items(), ("#1f77b4", "#d62728", "#2ca02c")):
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(s))
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"><title>{esc(label)}</title></polyline>'
                     + "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="{colour}"/>' for x, y in s if len(s) < 30))
    legend = " · ".join(esc(k) for k in series) if len(series) > 1 else ""
    return (f'<svg class="curve" width="{width}" height="{height}" role="img"><text x="4" y="12">{esc(title)}</text>'
            f'<text x="4" y="{height - 4}" class="tick">{y0:.3g}..{y1:.3g} · step {x0:g}..{x1:g} {legend}</text>'
            f'{"".join(lines)}</svg>')


def curves(metrics):
    charts = [svg_curve(title, {key: [(r["step"], r[key]) for r in metrics if r.get("stage") == stage
                                      and isinstance(r.get(key), (int, float))]}) for stage, key, title in CURVES]
    held = [r for r in metrics if r.get("stage") in ("eval_sft", "eval") and r.get("headline")]
    if held:
        series = {name: [(r["step"], r[r["headline"]]) for r in held if r["stage"] == stage]
                  for stage, name in (("eval_sft", "warm-up"), ("eval", "StepGRPO"))}
        charts.append(svg_curve(f"held-out {held[-1]['bench']} {held[-1]['headline']}", {k: v for k, v in series.items() if v}))
    return f'<div class="curves">{"".join(c for c in charts if c)}</div>'


# ----------------------------------------------------------------------------- pages
def page(title, body, thumbs, steps):
    options = "".join(f'<option value="{esc(s)}"{" selected" if s == steps[-1] else ""}>{esc(s)}</option>' for s in steps)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title><style>{STYLE}
{chr(10).join(thumbs.css)}</style></head><body><h1>{esc(title)}</h1>
<div class="controls"><label>step <select id="step">{options}</select></label>
<label><input type="checkbox" id="equal"> only groups whose rewards are all equal</label>
<label><input type="checkbox" id="wrong"> only wrong answers</label>
<label><input type="checkbox" id="invalid"> only invalid format</label> <span id="shown"></span></div>
{body}<script>{SCRIPT}</script></body></html>"""


def run_page(out_dir):
    out_dir = Path(out_dir)
    read = lambda name: [json.loads(l) for l in open(out_dir / name, encoding="utf-8") if l.strip()] \
        if (out_dir / name).is_file() else []   # noqa: E731
    rollouts, metrics = read("rollouts.jsonl"), read("metrics.jsonl")
    if not rollouts and not metrics:
        raise SystemExit(f"error: {out_dir} has neither rollouts.jsonl nor metrics.jsonl (pass a train.py --out_dir)")
    thumbs, by_step = Thumbs(), defaultdict(lambda: defaultdict(list))
    for r in rollouts:
        by_step[r["step"]][(r.get("group", r.get("id")), r.get("id"))].append(r)
    sections = "".join(f'<section class="step" data-step="{s}"><h2>step {s}</h2>'
                       f'{"".join(prompt_block(g, thumbs) for g in groups.values())}</section>'
                       for s, groups in sorted(by_step.items()))
    steps = [str(s) for s in sorted(by_step)] or ["-"]
    note = "" if rollouts else '<p class="muted">no rollouts.jsonl rows (train.py --log_rollouts_every)</p>'
    return page(f"rollouts of {out_dir.resolve().name}", curves(metrics) + note + sections, thumbs, steps)


def predictions_page(path, bench=None, data=None, image_root=None):
    """evaluate.py predictions, scored as evaluate.py scores them; the benchmark and data come from the file's
    first line unless given."""
    lines = [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]
    made = lines[0].get("produced_by", {}) if lines and "produced_by" in lines[0] else {}
    bench, prompt = bench or made.get("bench"), made.get("prompt", "r1vl")
    data = data or (None if str(made.get("data", "")).startswith("toy") else made.get("data"))
    if bench not in harness.BENCHES or (bench != "toy" and not data):
        raise SystemExit(f"error: {path} does not name its benchmark and data: pass --bench and --data")
    level = re.search(r"level (\d)", str(made.get("data", "")))
    recs = harness.load(bench, data, image_root, toy_n=made.get("limit") or 200, difficulty=int(level.group(1)) if level else 2)
    preds = {str(p["id"]): p["prediction"] for p in lines if "id" in p and isinstance(p.get("prediction"), str)}
    recs = [r for r in recs if r["id"] in preds]
    flags, _ = harness.score(bench, recs, preds, prompt, Counter())
    thumbs, cards = Thumbs(), []
    for r, ok in sorted(zip(recs, flags), key=lambda x: x[1]):      # wrong answers first, then file order
        text = preds[r["id"]]
        answer = harness.final_answer(rewards.visible_reply(text), prompt, Counter())
        thumb = thumbs.of(f"{bench}/{r['id']}", lambda: harness.open_image(r["images"]))
        cls = "right" if ok else "wrong"
        cards.append(f'<div class="group" data-equal="0"><div class="prompt">{thumb}<div><p class="id">{esc(r["id"])}</p>'
                     f'<p class="question">{esc(harness.question(r, bench, prompt))}</p>'
                     f'<p class="gold">gold: <b>{esc(r["answer"])}</b></p></div></div><div class="completions">'
                     f'<div class="completion {cls}" data-correct="{int(ok)}" data-valid="{int(not rewards.validity_failure(text))}">'
                     f'<div class="facts"><span class="verdict {cls}">answer {cls}</span>'
                     f'<span class="answer">extracted: {esc(answer[:200])}</span></div>{marked(text, [])}</div></div></div>')
    head = f'<p>{sum(flags)} of {len(flags)} right ({bench}, prompt {esc(prompt)})</p>'
    return page(f"{bench} predictions: {Path(path).name}", f'{head}<section class="step" data-step="all">{"".join(cards)}</section>',
                thumbs, ["all"])


STYLE = """body{font:13px/1.4 system-ui,sans-serif;margin:12px;background:#fafafa;color:#222}h1{font-size:17px}
h2{font-size:15px;margin:14px 0 6px}.controls{position:sticky;top:0;background:#fff;padding:6px;border:1px solid #ddd;
z-index:1}.controls label{margin-right:14px}.curves{display:flex;flex-wrap:wrap;gap:6px;margin:8px 0}
.curve{background:#fff;border:1px solid #ddd}.curve text{font-size:10px}.curve .tick{fill:#777}
.group{background:#fff;border:1px solid #ccc;margin:10px 0;padding:8px}.prompt{display:flex;gap:10px}
.thumb{flex:none;background-size:contain;background-repeat:no-repeat;border:1px solid #ddd}
.noimage{width:60px;height:60px;background:#eee}.question{white-space:pre-wrap;margin:2px 0}.id,.muted{color:#777;margin:0}
.completions{display:flex;gap:8px;overflow-x:auto;margin-top:8px;align-items:flex-start}
.completion{flex:0 0 330px;border:2px solid #bbb;padding:6px;font-size:12px}.completion.right{border-color:#2a2}
.completion.wrong{border-color:#d33}.facts span{display:inline-block;margin:0 6px 3px 0}
.verdict{font-weight:bold;padding:0 4px}.verdict.right{background:#cfc}.verdict.wrong{background:#fcc}.verdict.none{background:#eee}
.rule.bad{color:#b00}.rule.ok{color:#080}.chip{padding:0 3px;margin-left:2px;border-radius:3px}.chip.miss{background:#eee;color:#b00}
.sec{white-space:pre-wrap;border-left:3px solid #ccc;padding-left:5px;margin:3px 0}.sec.s-step{border-color:#69c}
.sec.s-answer{border-color:#2a2}
.k0{background:#ffe58a}.k1{background:#a8e6ff}.k2{background:#c5f5b8}.k3{background:#ffc9e8}.k4{background:#e0d0ff}.k5{background:#ffd2a6}
mark{padding:0 1px}ol.keysteps{margin:2px 0;padding-left:18px}ol.keysteps li{background:none}
ol.keysteps li::marker{font-weight:bold}"""

SCRIPT = """const $=id=>document.getElementById(id);
function show(){let n=0;for(const s of document.querySelectorAll('.step')){s.hidden=s.dataset.step!==$('step').value;
for(const g of s.querySelectorAll('.group')){let any=false;for(const c of g.querySelectorAll('.completion')){
const ok=(!$('wrong').checked||c.dataset.correct==='0')&&(!$('invalid').checked||c.dataset.valid==='0');
c.hidden=!ok;any=any||ok}g.hidden=!any||($('equal').checked&&g.dataset.equal!=='1');if(!s.hidden&&!g.hidden)n++}}
$('shown').textContent=n+' prompts shown'}
for(const id of ['step','equal','wrong','invalid'])$(id).addEventListener('change',show);show();"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="a train.py --out_dir, or an evaluate.py predictions .jsonl file")
    p.add_argument("--out", help="the HTML file (default: <out_dir>/viewer.html, or <predictions stem>.html)")
    p.add_argument("--bench", choices=harness.BENCHES, help="predictions: the benchmark, if the file does not say")
    p.add_argument("--data", help="predictions: the benchmark's data, if the file does not say")
    p.add_argument("--image_root", help="predictions: the benchmark's image folder, as evaluate.py --image_root")
    args = p.parse_args(argv)
    src = Path(args.source)
    if not src.exists():
        raise SystemExit(f"error: {src} does not exist")
    text = run_page(src) if src.is_dir() else predictions_page(src, args.bench, args.data, args.image_root)
    out = Path(args.out) if args.out else src / "viewer.html" if src.is_dir() else src.with_suffix(".html")
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
