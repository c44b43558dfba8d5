"""
Plan/execution data for GSM8K, and the analysis that shows the plans are abstract.

For every GSM8K problem an instruct model writes
  PLAN:      the reasoning steps in abstract terms ("the initial quantity", "the given amount"), no numbers
  EXECUTION: the concrete calculations, ending with `#### <number>`
which the hierarchical block-diffusion model (train_bd3lm.py) trains on as question/plan/execution segments.

Generation (vLLM on a GPU, a plain transformers loop everywhere else):
  python gen_plans.py --model meta-llama/Meta-Llama-3-8B-Instruct --split train --output_path data/gsm8k/plans.json
  python gen_plans.py --model ... --split train --num_examples 100 --output_path data/gsm8k/test_100.json
  python gen_plans.py --model ... --data_path ../shared/data/svamp/SVAMP.json --split train --output_path data/svamp/plans.json
  python gen_plans.py --model ... --data_path ../shared/data/svamp/SVAMP.json --split test --output_path data/svamp/plans_test.json
SVAMP (the transfer experiment's target): its Body and Question make the question, its Answer the gold number;
SVAMP.json holds all 1000 problems, split here into the first 700 (train) and the last 300 (test).
An execution whose final number disagrees with GSM8K's gold answer is regenerated up to --max_retries times, then
kept with valid=false. Finished batches are appended to <output_path>.partial.jsonl, so a killed run started again
with the same arguments skips the problems it already has; the JSON list at --output_path is written (atomically)
when every problem is done.

Analysis:
  python gen_plans.py --analyze --input_path data/gsm8k/plans.json --output_plot plans.png --num_samples 5
What counts as a number (for "numbers per plan"): a run of digits, optionally with thousands separators and a
decimal part, so "1,200", "3.5", "$25" and "50%" are one number each, "2/3" is two, and "2nd" is one. Spelled-out
numbers ("two", "half", "twice") do NOT count: a plan may say "add the two amounts" and still be abstract.
"""
import common  # first: its import installs the stop-signal handlers, before torch is imported

import dataclasses
import json
import math
import os
import random
import re
import time

from tasks import gsm8k

# -----------------------------------------------------------------------------
# config


@dataclasses.dataclass
class Config:
    # generation
    model: str = "meta-llama/Meta-Llama-3-8B-Instruct"  # HF hub id or local folder of an instruct model
    backend: str = "auto"  # auto (vllm when installed and CUDA is available, else transformers) | vllm | transformers
    split: str = "train"  # GSM8K split; also names the ids (gsm8k_train_0, ...)
    data_path: str = ""  # local GSM8K jsonl with question/answer; empty (or openai/gsm8k, ChilleD/SVAMP) = the hub
    # gsm8k | svamp (SVAMP.json: Body/Question/Equation/Answer records, or HF ChilleD/SVAMP) | auto (svamp when
    # data_path is a .json file, gsm8k otherwise)
    dataset: str = "auto"
    num_examples: int = -1  # the first N problems of the split; -1 = all
    output_path: str = "data/gsm8k/plans.json"
    temperature: float = 0.7
    top_p: float = 0.95
    retry_temperature: float = 0.7  # used for retries when temperature is 0 (greedy would repeat the same answer)
    max_tokens: int = 512  # new tokens per answer; plan+execution is ~150 GPT-2 tokens on average
    max_retries: int = 2  # extra attempts for a wrong final number or an unparseable answer
    batch_size: int = 256  # problems per engine call; the unit of progress written to the .partial.jsonl sidecar
    seed: int = 1337
    tensor_parallel_size: int = 1  # vllm: GPUs per model
    gpu_memory_utilization: float = 0.9  # vllm
    max_model_len: int = 4096  # vllm: prompt (~700 tokens with the example) + answer fits easily
    dtype: str = "auto"  # vllm / transformers weights dtype: auto | bfloat16 | float16 | float32
    device: str = "auto"  # transformers backend: auto | cuda | mps | cpu
    # analysis
    analyze: bool = False
    input_path: str = ""  # plans to analyze; empty = output_path
    output_plot: str = ""  # PNG with four panels; a <stem>_summary.json is written beside it
    num_samples: int = 5  # examples printed
    tokenizer_file: str = ""  # GPT-2 ranks in tiktoken format; empty = ../shared/data/tokenizers/gpt2.tiktoken if
    #                           present, else tiktoken's own cache


# -----------------------------------------------------------------------------
# the prompt: rules that make the plan abstract, plus one worked example to anchor the format

SYSTEM_PROMPT = """You solve grade-school math word problems in two clearly separated parts.

PLAN: the reasoning steps only, written so they would fit any problem with the same structure.
Rules for the plan:
- Describe only the logical steps and the operations to apply (add, subtract, multiply, divide, take a percentage).
- Do NOT write any specific numbers or calculations from the problem.
- Refer to quantities in abstract terms such as "the initial quantity", "the given amount", "the price per item", "the total".
- Use 2-4 sentences.
- Give the structure of the solution, not its execution.

EXECUTION: carry out the plan with the actual numbers, one calculation per step, and finish with a last line of the
form "#### <number>" holding only the final numerical answer.

Answer in exactly this format:
PLAN: <abstract steps>
EXECUTION: <calculations>
#### <number>"""

# a made-up problem (not from GSM8K, so no test problem leaks into the prompt)
EXAMPLE_QUESTION = ("A baker makes 48 muffins. She sells 3/4 of them in the morning and gives 5 of the rest to a "
                    "neighbor. How many muffins does she have left?")
EXAMPLE_ANSWER = """PLAN: Find the number sold by taking the given fraction of the initial quantity. Subtract the amount sold from the initial quantity to get what remains. Then subtract the amount given away to find how many are left.
EXECUTION: Sold in the morning: 48 * 3/4 = 36 muffins. Remaining: 48 - 36 = 12 muffins. After giving some to the neighbor: 12 - 5 = 7 muffins.
#### 7"""


def build_messages(question):
    """The chat for one problem: system rules, the worked example as a previous turn, then the problem."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Problem: {EXAMPLE_QUESTION}"},
        {"role": "assistant", "content": EXAMPLE_ANSWER},
        {"role": "user", "content": f"Problem: {question.strip()}"},
    ]


# -----------------------------------------------------------------------------
# parsing the model's answer (checked against GSM8K's gold number with gsm8k.same_number, as eval scores)

# "PLAN:" / "**Plan:**" / "## Execution:" at the start of a line
MARKER_RE = re.compile(r"^[ \t>#*_]*(PLAN|EXECUTION)[ \t*_]*:[ \t*_]*", re.IGNORECASE | re.MULTILINE)


def parse_output(text):
    """Model text -> {plan, execution, answer} or None when the format is not there.
    The execution keeps its closing '#### N' line (the GSM8K convention) and drops anything after it."""
    if not isinstance(text, str):
        return None
    markers = list(MARKER_RE.finditer(text))
    plan_m = next((m for m in markers if m.group(1).upper() == "PLAN"), None)
    if plan_m is None:
        return None
    exec_m = next((m for m in markers if m.group(1).upper() == "EXECUTION" and m.start() > plan_m.start()), None)
    if exec_m is None:
        return None
    plan = text[plan_m.end():exec_m.start()].strip().strip("*_ ").strip()
    rest = text[exec_m.end():]
    final = gsm8k.FINAL_ANSWER_RE.search(rest)
    if final is None:
        return None
    steps = rest[:final.start()].strip().strip("*_ ").strip()
    answer = gsm8k.normalize_number(final.group(1))
    if not plan or not steps or "####" in plan or answer is None:
        return None
    return {"plan": plan, "execution": f"{steps}\n#### {answer}", "answer": answer}


# -----------------------------------------------------------------------------
# GSM8K


def load_gsm8k(split, data_path="", num_examples=-1):
    """[{index, id, question, answer_numerical}] from a local jsonl or HF openai/gsm8k (main)."""
    rows = gsm8k.read_gsm8k(split, data_path)
    if num_examples is not None and num_examples > 0:
        rows = rows[:num_examples]
    return [{"index": i, "id": f"gsm8k_{split}_{i}", "question": r["question"],
             "answer_numerical": gsm8k.gold_number(r["answer"])} for i, r in enumerate(rows)]


SVAMP_TRAIN = 700  # SVAMP.json holds all 1000 problems: train = the first 700, test = the last 300 (the sizes of
#                    ChilleD/SVAMP's splits, not necessarily the same problems)


def load_svamp(split, data_path="", num_examples=-1):
    """[{index, id, question (Body + Question), answer_numerical (Answer)}] from SVAMP.json or HF ChilleD/SVAMP;
    the ids keep SVAMP's own (svamp_chal-1, ...), so train and test plans never share one."""
    if split not in ("train", "test"):
        raise common.ConfigError(f"SVAMP has the splits train and test, not '{split}'")
    try:
        rows = gsm8k.load_svamp(data_path, split)
    except ValueError as e:
        raise common.ConfigError(str(e)) from e
    if not gsm8k.names_hub(data_path, gsm8k.SVAMP_HUB):  # SVAMP.json: all 1000 problems in one file
        rows = rows[:SVAMP_TRAIN] if split == "train" else rows[SVAMP_TRAIN:]
    if num_examples is not None and num_examples > 0:
        rows = rows[:num_examples]
    return [{"index": i, "id": f"svamp_{r['id']}", "question": r["question"],
             "answer_numerical": int(float(r["gold"])) if float(r["gold"]).is_integer() else float(r["gold"])}
            for i, r in enumerate(rows)]


def dataset_of(cfg):
    if cfg.dataset not in ("auto", "gsm8k", "svamp"):
        raise common.ConfigError(f"dataset '{cfg.dataset}' is not one of auto, gsm8k, svamp")
    if cfg.dataset != "auto":
        return cfg.dataset
    return "svamp" if cfg.data_path.endswith(".json") or cfg.data_path == gsm8k.SVAMP_HUB else "gsm8k"


def load_problems(cfg):
    svamp = dataset_of(cfg) == "svamp"
    try:
        if svamp:
            return load_svamp(cfg.split, cfg.data_path, cfg.num_examples)
        return load_gsm8k(cfg.split, cfg.data_path, cfg.num_examples)
    except gsm8k.HubUnreachable as e:
        example = "../shared/data/svamp/SVAMP.json" if svamp else f"../shared/data/gsm8k/{cfg.split}.jsonl"
        what = f"names the hub ({cfg.data_path})" if cfg.data_path else "is not set"
        raise common.ConfigError(f"--data_path {what}, and the HF hub did not answer ({e.reason}): pass a "
                                 f"local file, e.g. --data_path {example}") from None


# -----------------------------------------------------------------------------
# backends: generate(conversations, temperature, seeds) -> one answer string per conversation


def prompt_text(tokenizer, messages):
    """The model's own chat template, ending with the assistant header, as a string."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class VLLMBackend:
    """vLLM's offline engine. The chat template is rendered here and passed as token ids (no second BOS);
    every request has its own seed, so results do not depend on how requests were batched."""

    def __init__(self, cfg):
        from vllm import LLM, SamplingParams
        self.SamplingParams = SamplingParams
        self.cfg = cfg
        self.llm = LLM(model=cfg.model, tensor_parallel_size=cfg.tensor_parallel_size, dtype=cfg.dtype,
                       seed=cfg.seed, gpu_memory_utilization=cfg.gpu_memory_utilization,
                       max_model_len=cfg.max_model_len)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, conversations, temperature, seeds):
        prompts = [{"prompt_token_ids": self.tokenizer(prompt_text(self.tokenizer, c), add_special_tokens=False)
                    ["input_ids"]} for c in conversations]
        params = [self.SamplingParams(temperature=temperature, top_p=self.cfg.top_p if temperature > 0 else 1.0,
                                      max_tokens=self.cfg.max_tokens, seed=s) for s in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].text if o.outputs else "" for o in outputs]


class TransformersBackend:
    """Plain transformers: batched generate with left padding. Slow; for small runs and tests."""

    def __init__(self, cfg):
        import torch
        import engine
        self.torch, self.cfg = torch, cfg
        self.device = common.autodetect_device() if cfg.device == "auto" else cfg.device
        lm = engine.load_model(cfg.model, device=self.device, dtype=common.resolve_dtype(cfg.dtype, self.device))
        self.model, self.tokenizer = lm.model, lm.tok.tok
        self.tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def generate(self, conversations, temperature, seeds):
        torch = self.torch
        torch.manual_seed(seeds[0])  # one generator for the whole batch: reproducible for a fixed batching
        texts = [prompt_text(self.tokenizer, c) for c in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=self.cfg.top_p) if temperature > 0 \
            else dict(do_sample=False)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.cfg.max_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id, **sampling)
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def make_backend(cfg):
    import engine  # lazily: torch is not needed for the analysis
    here = os.path.exists(cfg.model) or common.list_checkpoints(os.path.dirname(cfg.model))  # (RUN/latest)
    if engine.is_native(cfg.model) and here:
        raise common.ConfigError(f"model={cfg.model} is a checkpoint of this repository; gen_plans.py generates with "
                                 f"an HF instruct model (a hub id or HF folder): export it first with python "
                                 f"export_hf.py checkpoint={cfg.model} output_dir=DIR, then pass --model DIR")
    engine.check_model_path(cfg.model)
    name = cfg.backend
    if name == "auto":
        name = "vllm" if common.vllm_available() else "transformers"
    if name == "vllm":
        if not common.vllm_available():
            raise common.ConfigError("backend=vllm needs the vllm package and a CUDA GPU; use --backend transformers")
        return VLLMBackend(cfg)
    if name == "transformers":
        return TransformersBackend(cfg)
    raise common.ConfigError(f"unknown backend {cfg.backend!r} (expected auto, vllm or transformers)")


# -----------------------------------------------------------------------------
# generation with retries, an append-only sidecar, and resume


def partial_path(output_path):
    return output_path + ".partial.jsonl"


def meta_path(output_path):
    return os.path.splitext(output_path)[0] + ".meta.json"


def read_done(output_path):
    """Records already made: the final JSON list of an earlier run and the sidecar of an interrupted one.
    A last sidecar line cut short by a kill is ignored (that problem is simply generated again)."""
    done = {}
    if os.path.isfile(output_path):
        with open(output_path) as f:
            for rec in json.load(f):
                done[rec["id"]] = rec
    side = partial_path(output_path)
    if os.path.isfile(side):
        for rec in common.iter_jsonl(side, skip_bad=True):  # a kill may have cut the last line short
            done[rec["id"]] = rec
    return done


def example_seed(seed, index, attempt):
    """A distinct, reproducible seed per (problem, attempt): a retry draws a different sample."""
    return (seed * 1_000_003 + index * 101 + attempt) % (2**31 - 1)


def make_record(problem, parsed, attempts, raw=None):
    rec = {"id": problem["id"], "question": problem["question"],
           "plan": parsed["plan"] if parsed else "", "execution": parsed["execution"] if parsed else "",
           "answer_numerical": problem["answer_numerical"]}
    valid = parsed is not None and gsm8k.same_number(parsed["answer"], problem["answer_numerical"])
    rec["valid"] = valid
    rec["attempts"] = attempts
    if not valid:
        rec["error"] = "unparseable" if parsed is None else "wrong_answer"
        rec["predicted"] = parsed["answer"] if parsed else None
        if parsed is None:
            rec["raw"] = raw  # kept to see what went wrong; such records have empty plan/execution
    return rec


def solve_batch(problems, backend, cfg):
    """Generate, check against the gold number, regenerate the failures; returns one record per problem."""
    records, best = {}, {}  # best: id -> (parsed or None, raw) of the failed attempts, parsed preferred
    pending = list(problems)
    for attempt in range(cfg.max_retries + 1):
        if not pending:
            break
        temperature = cfg.temperature if (attempt == 0 or cfg.temperature > 0) else cfg.retry_temperature
        texts = backend.generate([build_messages(p["question"]) for p in pending], temperature,
                                 [example_seed(cfg.seed, p["index"], attempt) for p in pending])
        if len(texts) != len(pending):
            raise RuntimeError(f"backend returned {len(texts)} answers for {len(pending)} prompts")
        still = []
        for p, text in zip(pending, texts):
            parsed = parse_output(text)
            if parsed is not None and gsm8k.same_number(parsed["answer"], p["answer_numerical"]):
                records[p["id"]] = make_record(p, parsed, attempt + 1)
                continue
            if parsed is not None or best.get(p["id"], (None,))[0] is None:
                best[p["id"]] = (parsed, text)
            still.append(p)
        pending = still
    for p in pending:
        parsed, raw = best[p["id"]]
        records[p["id"]] = make_record(p, parsed, cfg.max_retries + 1, raw=raw)
    return [records[p["id"]] for p in problems]


def generate_plans(cfg, problems, backend):
    """Work through the problems not yet done, batch by batch, appending each finished batch to the sidecar;
    then write the JSON list (in problem order) atomically and remove the sidecar."""
    out_dir = os.path.dirname(os.path.abspath(cfg.output_path))
    os.makedirs(out_dir, exist_ok=True)
    done = read_done(cfg.output_path)
    wanted = {p["id"] for p in problems}
    todo = [p for p in problems if p["id"] not in done]
    n_valid = sum(1 for p in problems if p["id"] in done and done[p["id"]].get("valid", True))
    n_done = len(problems) - len(todo)
    if n_done:
        print(f"resuming: {n_done} of {len(problems)} problems already done in {cfg.output_path}[.partial.jsonl]")
    t0 = time.time()
    bar = common.progress(total=len(problems), initial=n_done, desc="gen_plans", unit="ex")
    with open(partial_path(cfg.output_path), "a") as side:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            records = solve_batch(batch, backend, cfg)
            for rec in records:
                side.write(json.dumps(rec) + "\n")
                done[rec["id"]] = rec
            side.flush()
            os.fsync(side.fileno())  # a finished batch survives a kill
            n_done += len(records)
            n_valid += sum(r["valid"] for r in records)
            bar.update(len(records))
            bar.set_postfix(valid=f"{n_valid / n_done:.3f}", refresh=False)  # the bar itself shows examples/s
    bar.close()
    extra = len(set(done) - wanted)
    if extra:
        print(f"note: {extra} earlier records outside this selection are not in the new {cfg.output_path}")
    results = [done[p["id"]] for p in problems]
    common.atomic_write_json(cfg.output_path, results)
    os.remove(partial_path(cfg.output_path))
    stats = {"n": len(results), "n_valid": sum(r.get("valid", True) for r in results),
             "n_wrong_answer": sum(r.get("error") == "wrong_answer" for r in results),
             "n_unparseable": sum(r.get("error") == "unparseable" for r in results),
             "n_generated_this_run": len(todo), "seconds_this_run": round(time.time() - t0, 2),
             "config": dataclasses.asdict(cfg)}
    common.atomic_write_json(meta_path(cfg.output_path), stats)
    return results, stats


# -----------------------------------------------------------------------------
# analysis: lengths, numbers per plan vs execution, operations

# digits, optional thousands separators, optional decimals: "1,200" "3.5" "25" (see the module docstring)
NUMBER_RE = re.compile(r"\d+(?:,\d{3}(?!\d))*(?:\.\d+)?")
# an arithmetic symbol between two operands ("12 + 8", "3/4", "(2 + 3) * 4"); a hyphen inside a word is not one
SYMBOL_OP_RE = re.compile(r"(?<=[\d)%])\s*([+\-*/×÷])\s*(?=[\d(.$])")
SYMBOL_OPS = {"+": "add", "-": "subtract", "*": "multiply", "×": "multiply", "/": "divide", "÷": "divide"}
WORD_OPS = {
    "add": re.compile(r"\b(?:add|adds|added|adding|addition|plus|sum|sums)\b", re.IGNORECASE),
    "subtract": re.compile(r"\b(?:subtract\w*|minus|difference|deduct\w*)\b", re.IGNORECASE),
    "multiply": re.compile(r"\b(?:multipl\w*|times|product)\b", re.IGNORECASE),
    "divide": re.compile(r"\b(?:divid\w*|division|quotient)\b", re.IGNORECASE),
    "percent": re.compile(r"\bpercent\w*\b", re.IGNORECASE),
}
OPERATIONS = list(WORD_OPS)
# plan categories by how many numbers the plan holds, with the target share of each
CATEGORIES = [  # (name, lowest count, highest count, target share low, target share high)
    ("perfect", 0, 0, 0.45, 0.55),
    ("mostly_abstract", 1, 2, 0.30, 0.40),
    ("somewhat_concrete", 3, 5, 0.10, 0.15),
    ("too_concrete", 6, math.inf, 0.0, 0.05),
]
RATIO_TARGET = 3.0  # numbers per execution / numbers per plan
SEGMENTS = ["question", "plan", "execution", "total"]


def count_numbers(text):
    return len(NUMBER_RE.findall(text))


def count_operations(text):
    """{add, subtract, multiply, divide, percent}: symbols between operands plus operation words ('%' is percent)."""
    counts = {op: len(rx.findall(text)) for op, rx in WORD_OPS.items()}
    for sym in SYMBOL_OP_RE.findall(text):
        counts[SYMBOL_OPS[sym]] += 1
    counts["percent"] += text.count("%")
    return counts


def plan_category(n_numbers):
    for name, lo, hi, _, _ in CATEGORIES:
        if lo <= n_numbers <= hi:
            return name
    raise ValueError(n_numbers)


def recommend_length(p95, floor=64):
    """A segment length to configure: the 95th percentile rounded up to a power of two (at least `floor`)."""
    return max(floor, 1 << max(0, math.ceil(math.log2(max(1.0, p95)))))


def default_tokenizer_file():
    path = os.path.join(common.SHARED_DATA, "tokenizers", "gpt2.tiktoken")
    return path if os.path.isfile(path) else None


def analyze_records(records, tokenizer):
    """Everything the report and the plot need. Records flagged valid=false are left out (their plans are
    either empty or tied to a wrong answer); records without the flag count as valid."""
    import numpy as np
    kept = [r for r in records if r.get("valid", True)]
    if not kept:
        raise ValueError("no valid records to analyze")
    lengths = {s: [] for s in SEGMENTS}
    for r in kept:
        q, p, e = (len(tokenizer.encode(r[k])) for k in ("question", "plan", "execution"))
        for s, n in zip(SEGMENTS, (q, p, e, q + p + e)):
            lengths[s].append(n)
    plan_numbers = [count_numbers(r["plan"]) for r in kept]
    exec_numbers = [count_numbers(r["execution"]) for r in kept]
    plan_mean, exec_mean = float(np.mean(plan_numbers)), float(np.mean(exec_numbers))
    ratio = exec_mean / plan_mean if plan_mean > 0 else None  # None: the plans hold no numbers at all
    categories = {}
    cats = [plan_category(n) for n in plan_numbers]
    for name, _, _, lo, hi in CATEGORIES:
        count = cats.count(name)
        share = count / len(kept)
        met = share < hi if lo == 0.0 else lo <= share <= hi
        categories[name] = {"count": count, "share": share, "target": [lo, hi], "met": met}
    ops = {"plan": {op: 0 for op in OPERATIONS}, "execution": {op: 0 for op in OPERATIONS}}
    for r in kept:
        for part in ("plan", "execution"):
            for op, n in count_operations(r[part]).items():
                ops[part][op] += n
    length_stats = {}
    for s in SEGMENTS:
        arr = np.array(lengths[s], dtype=np.float64)
        p95 = float(np.percentile(arr, 95))
        length_stats[s] = {"mean": float(arr.mean()), "p95": p95, "max": int(arr.max()),
                           "recommended": recommend_length(p95)}
    return {
        "n_records": len(records), "n_analyzed": len(kept), "n_invalid_skipped": len(records) - len(kept),
        "lengths": length_stats,
        "numbers": {"plan_mean": plan_mean, "execution_mean": exec_mean, "exec_plan_ratio": ratio,
                    "ratio_target": RATIO_TARGET, "ratio_met": (ratio is None and exec_mean > 0) or
                    (ratio is not None and ratio > RATIO_TARGET)},
        "categories": categories,
        "operations": ops,
        # per-record values for the plot (not written to the summary)
        "_per_record": {"lengths": lengths, "plan_numbers": plan_numbers, "exec_numbers": exec_numbers},
    }


def print_report(summary, records, num_samples, seed=0):
    L, N = summary["lengths"], summary["numbers"]
    print(f"analyzed {summary['n_analyzed']} of {summary['n_records']} records "
          f"({summary['n_invalid_skipped']} flagged invalid left out)")
    print("\nGPT-2 token lengths     mean     p95     max  -> configure")
    for s in SEGMENTS:
        print(f"  {s:<12} {L[s]['mean']:>12.1f} {L[s]['p95']:>7.1f} {L[s]['max']:>7d}  -> {L[s]['recommended']}")
    ratio = "inf (plans hold no numbers)" if N["exec_plan_ratio"] is None else f"{N['exec_plan_ratio']:.2f}x"
    print(f"\nnumbers per plan {N['plan_mean']:.2f}, per execution {N['execution_mean']:.2f}, "
          f"exec/plan ratio {ratio} (target > {N['ratio_target']:.0f}x: {'met' if N['ratio_met'] else 'NOT met'})")
    print("\nplan category               share   target     met")
    labels = {"perfect": "perfect (0 numbers)", "mostly_abstract": "mostly abstract (1-2)",
              "somewhat_concrete": "somewhat concrete (3-5)", "too_concrete": "too concrete (>5)"}
    for name, c in summary["categories"].items():
        lo, hi = c["target"]
        target = f"<{hi:.0%}" if lo == 0 else f"{lo:.0%}-{hi:.0%}"
        print(f"  {labels[name]:<25} {c['share']:>6.1%}  {target:>8}  {'yes' if c['met'] else 'no':>5}")
    print("\noperations      plan  execution")
    for op in OPERATIONS:
        print(f"  {op:<10} {summary['operations']['plan'][op]:>7d} {summary['operations']['execution'][op]:>10d}")
    kept = [r for r in records if r.get("valid", True)]
    for r in random.Random(seed).sample(kept, min(num_samples, len(kept))):
        print(f"\n--- {r.get('id', '')} (plan numbers: {count_numbers(r['plan'])})")
        print(f"QUESTION: {r['question']}\nPLAN: {r['plan']}\nEXECUTION: {r['execution']}")


def plot_summary(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    per = summary["_per_record"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0, 0]
    top = max(max(per["plan_numbers"]), max(per["exec_numbers"])) + 1
    bins = np.arange(0, top + 1) - 0.5
    ax.hist(per["plan_numbers"], bins=bins, alpha=0.6, label="plan")
    ax.hist(per["exec_numbers"], bins=bins, alpha=0.6, label="execution")
    ax.set(title="numbers per text", xlabel="numbers", ylabel="records")
    ax.legend()
    ax = axes[0, 1]
    x = np.arange(len(OPERATIONS))
    ax.bar(x - 0.2, [summary["operations"]["plan"][o] for o in OPERATIONS], 0.4, label="plan")
    ax.bar(x + 0.2, [summary["operations"]["execution"][o] for o in OPERATIONS], 0.4, label="execution")
    ax.set_xticks(x, OPERATIONS)
    ax.set(title="operations", ylabel="count")
    ax.legend()
    ax = axes[1, 0]
    ax.boxplot([per["lengths"][s] for s in SEGMENTS])
    ax.set_xticks(range(1, len(SEGMENTS) + 1), SEGMENTS)
    ax.set(title="GPT-2 token lengths", ylabel="tokens")
    ax = axes[1, 1]
    ax.scatter(per["plan_numbers"], per["exec_numbers"], alpha=0.3, s=12)
    ax.set(title="numbers: plan vs execution", xlabel="plan", ylabel="execution")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_path(plot_path):
    return os.path.splitext(plot_path)[0] + "_summary.json"


def read_records(path):
    """The plan records to analyze: the JSON list gen_plans.py writes (or a jsonl), objects with question, plan
    and execution; anything else is refused, naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input_path not found: {path}")
    if path.endswith(".jsonl"):
        records = common.read_jsonl(path)
    else:
        with open(path) as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not a JSON file ({e})") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            got = ("a JSON object" if isinstance(records, dict) else "a list of other values"
                   if isinstance(records, list) else f"a {type(records).__name__}")
            raise ValueError(f"{path}: expected a JSON list of plan records (objects with question, plan and "
                             f"execution, as gen_plans.py writes), got {got}")
    return gsm8k.require_fields(records, ("question", "plan", "execution"), path)


def run_analysis(cfg):
    path = cfg.input_path or cfg.output_path
    records = read_records(path)
    tokenizer = common.Tokenizer("gpt2", tokenizer_file=cfg.tokenizer_file or default_tokenizer_file())
    summary = analyze_records(records, tokenizer)
    print_report(summary, records, cfg.num_samples, cfg.seed)
    if cfg.output_plot:
        if os.path.abspath(summary_path(cfg.output_plot)) == os.path.abspath(path):
            raise ValueError(f"the summary {summary_path(cfg.output_plot)} would overwrite the input; "
                             "choose another output_plot name")
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output_plot)), exist_ok=True)
        plot_summary(summary, cfg.output_plot)
        common.atomic_write_json(summary_path(cfg.output_plot),
                                 {k: v for k, v in summary.items() if not k.startswith("_")} | {"input_path": path})
        print(f"\nwrote {cfg.output_plot} and {summary_path(cfg.output_plot)}")
    return summary


# -----------------------------------------------------------------------------


def main(argv=None, backend=None):
    """`backend` lets a caller (a test) hand in an object with generate(conversations, temperature, seeds)."""
    cfg = common.load_config(Config, argv)
    if cfg.analyze:
        return run_analysis(cfg)
    if cfg.max_retries < 0 or cfg.batch_size < 1:
        raise common.ConfigError("max_retries must be >= 0 and batch_size >= 1")
    problems = load_problems(cfg)
    if not problems:
        raise ValueError(f"no {dataset_of(cfg).upper()} {cfg.split} problems in {cfg.data_path or 'the hub split'} "
                         f"to make plans for")
    print(f"{len(problems)} {dataset_of(cfg).upper()} {cfg.split} problems -> {cfg.output_path}")
    done = read_done(cfg.output_path)
    if backend is None and any(p["id"] not in done for p in problems):  # no model load when all is done
        backend = make_backend(cfg)
    results, stats = generate_plans(cfg, problems, backend)
    print(f"{stats['n']} records: {stats['n_valid']} valid, {stats['n_wrong_answer']} wrong final answer, "
          f"{stats['n_unparseable']} unparseable; wrote {cfg.output_path} and {meta_path(cfg.output_path)}")
    return results


if __name__ == "__main__":
    common.run_main(main)
