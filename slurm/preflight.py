"""
The pipeline's preflight: before its first stage, slurm/pipeline.sh hands this script the commands of every stage
it is about to run, and it checks their inputs dry, in seconds: the local files the configs name, the HF hub
sources (datasets and models: on the hub, or in the local caches when the hub is unreachable), the GPT-2 BPE
ranks (a tokenizer_file, or tiktoken's cache) and the outputs of earlier stages a stage reads (data, checkpoints,
HF folders: made by a stage before it in this launch, or already on disk). Everything missing comes back in ONE
message, each item with what to pass instead (a local file and the config key that takes it), so that a launch
without its inputs stops at once, not hours in at the first evaluation.

    python slurm/preflight.py PLAN      # PLAN: the stages' names and commands, as pipeline.sh writes them
                                        # (each word NUL-terminated, a command ended by the word RECORD_END)

Exit status 0 when every input is there; 1 with the message on stderr when something is missing.
What each stage reads is spelled out below, one function per stage script (STAGES); a stage script this file
does not know is run unchecked.
"""
import os
import sys
import urllib.error
import urllib.request
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_END = "\x1e"
TRUE = ("1", "true", "yes", "on")


# -----------------------------------------------------------------------------
# the hub: reachable or not (probed once, before the HF libraries are imported, so that an unreachable hub puts
# them in offline mode: they then read their caches instead of retrying each request for ~20 s)

HUB_DOWN = None  # why the hub is unreachable (main sets it), else None
common = None    # imported by main, after the probe


def probe_hub():
    """None when the HF hub answers, else why not."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in TRUE:
            return f"offline: {var}=1"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(f"{endpoint}/api/datasets/openai/gsm8k", timeout=5).close()
    except urllib.error.HTTPError:
        return None  # it answered (an error status is an answer)
    except OSError as e:  # URLError, timeouts, refused connections
        return f"{endpoint} did not answer: {' '.join(str(getattr(e, 'reason', e)).split())}"
    return None



# -----------------------------------------------------------------------------
# what is needed, by whom, and what a user passes instead


class Preflight:
    def __init__(self):
        self.needs = OrderedDict()  # key -> {"what", "check", "fixes": {hint: [configs]}, "also"}
        self.errors = []            # config errors: a stage that cannot even read its settings
        self.made = []              # (output path, facts) of the stages planned so far, in order
        self.stage = self.config = ""

    def need(self, key, what, check, fix=None, also="", where=False, config=None):
        """Record an input; `check()` returns None when it is there, else why it is not. fix: 'key=VALUE' that
        gives a local copy in the config (default: this stage's); also: a last word on it; where: name the
        configs that ask for it."""
        config = config or self.config or self.stage
        n = self.needs.setdefault(key, {"what": what, "check": check, "fixes": OrderedDict(), "also": also,
                                        "where": [] if where else None})
        n["also"] = n["also"] or also
        lists = ([n["where"]] if n["where"] is not None else []) + ([n["fixes"].setdefault(fix, [])] if fix else [])
        for names in lists:
            if config not in names:
                names.append(config)

    # --- the kinds of input

    def local(self, key, path, what_file=""):
        """A file (or folder, or glob) the config names."""
        self.need(("file", key, path), f"{key}={path}",
                  lambda: None if exists(path) else "no such file" + (f" ({what_file})" if what_file else ""),
                  where=True)

    def hub_dataset(self, repo, config, fix, copy=""):
        """A dataset on the HF hub; copy: what a local copy of it is (default: LOCAL_COPY's words)."""
        name = f"{repo} ({config})" if config else repo
        copy = LOCAL_COPY.get(repo, copy)
        self.need(("dataset", repo, config), f"{name} on the HF hub", lambda: check_dataset(repo, config), fix,
                  f"FILE: {copy}" if copy else "")

    def hub_model(self, key, name):
        self.need(("model", name), f"{key}={name}", lambda: check_model(name), also="Pass a local HF folder",
                  where=True)

    def upstream(self, key, path):
        """An output of an earlier stage: made by one planned before this one, or on disk already."""
        if self.made_by(path) is None and not exists(path):
            self.need(("upstream", path), f"{key}={path} ({self.stage})",
                      lambda: "not there, and no stage of this launch before it makes it (is the stage that "
                              "makes it skipped by a --skip-* option?)")

    def model(self, key, path):
        """A model a stage starts from: a stage output, a local folder/checkpoint, or an HF hub id."""
        if self.made_by(path) is not None or exists(path):
            return
        if looks_like_hub_id(path):
            self.hub_model(key, path)
        else:
            self.upstream(key, path)

    def gpt2_ranks(self, tokenizer_file, config):
        """The GPT-2 BPE ranks: tokenizer_file, or tiktoken's cache; config: the one that would take the file."""
        if tokenizer_file:
            self.need(("file", "tokenizer_file", tokenizer_file), f"tokenizer_file={tokenizer_file}",
                      lambda: None if os.path.isfile(tokenizer_file) else "no such file (the GPT-2 ranks)",
                      where=True, config=config)
        else:
            self.need(("tiktoken",), "the GPT-2 BPE ranks (tokenizer gpt2)", check_tiktoken, "tokenizer_file=FILE",
                      "FILE: a tiktoken-format gpt2 ranks file; or set TIKTOKEN_CACHE_DIR to a tiktoken cache that "
                      "holds gpt2", config=config)

    # --- what the planned stages make

    def made_by(self, path):
        """The facts of the planned output that `path` is, lies in or holds; None if no planned stage makes it."""
        p = os.path.normpath(path)
        if os.path.basename(p) == "latest":
            p = os.path.dirname(p)
        for out, facts in reversed(self.made):
            if p == out or p.startswith(out + os.sep) or out.startswith(p + os.sep):
                return facts
        return None

    def makes(self, path, **facts):
        if path:
            self.made.append((os.path.normpath(path), facts))

    def tokenizer_of(self, path):
        """(kind, tokenizer_file, run config) of a native checkpoint or data folder, planned or on disk;
        kind None when it is an HF folder (its tokenizer.json serves) or cannot be told."""
        facts = self.made_by(path)
        if facts is not None:
            return facts.get("kind"), facts.get("tokenizer_file", ""), facts.get("config", "")
        meta = os.path.join(path, "meta.json")
        if os.path.isfile(meta):
            try:
                return common.load_meta(path)["tokenizer"]["kind"], "", ""
            except (OSError, ValueError, KeyError):
                return None, "", ""
        try:
            import torch
            ckpt = torch.load(common.resolve_checkpoint(path), map_location="cpu", weights_only=True, mmap=True)
            return ckpt["tokenizer"]["kind"], (ckpt.get("config") or {}).get("tokenizer_file") or "", ""
        except Exception:  # an HF folder, or nothing readable: nothing to check here
            return None, "", ""

    def native_ranks(self, model, tokenizer_file):
        """A stage that loads a native checkpoint builds its tokenizer: GPT-2 ranks from its tokenizer_file, else
        the run's, else tiktoken's cache."""
        kind, run_file, run_config = self.tokenizer_of(model)
        if kind == "gpt2":
            self.gpt2_ranks(tokenizer_file or run_file, self.config if tokenizer_file or not run_config else run_config)

    # --- the report

    def problems(self):
        lines = list(self.errors)
        for n in self.needs.values():
            why = n["check"]()
            if why is None:
                continue
            line = f"{n['what']}{' in ' + ', '.join(n['where']) if n['where'] else ''}: {why}"
            if n["fixes"]:
                line += ". Pass " + "; ".join(f"{hint} in {', '.join(where)}" for hint, where in n["fixes"].items())
            if n["also"]:
                line += f". {n['also']}"
            lines.append(line)
        return lines


LOCAL_COPY = {  # what a local copy of a hub dataset is, for the message
    "openai/gsm8k": "jsonl rows {question, answer} of the split the key reads (train: fewshot_path, data_paths, "
                    "train_path; test: the others)",
    "ChilleD/SVAMP": "SVAMP.json (a list of {Body, Question, Answer})",
    "Rowan/hellaswag": "HellaSwag validation: jsonl rows {ctx, endings, label}, or the 6-lines-per-item text",
}


def exists(path):
    """A file, folder or glob match; RUN/latest: the run folder."""
    if any(ch in path for ch in "*?["):
        import glob
        return bool(glob.glob(path))
    return os.path.exists(path) or os.path.basename(path) == "latest" and os.path.isdir(os.path.dirname(path) or ".")


def looks_like_hub_id(name):
    """owner/name (or a bare name such as gpt2), not a path: no leading '.', '/' or '~', no file suffix."""
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "~")) and \
        not os.path.splitext(name)[1] in (".pt", ".bin", ".json", ".yaml", ".safetensors")


# -----------------------------------------------------------------------------
# the checks (each run once per input, however many stages need it)


def check_dataset(repo, config):
    if HUB_DOWN:  # the datasets cache, then: what load_dataset would find offline
        try:
            import datasets
            datasets.load_dataset_builder(repo, config)
            return None
        except Exception:
            return "the HF hub is unreachable, and the datasets cache holds no copy"
    from huggingface_hub import HfApi
    try:
        info = HfApi().dataset_info(repo, timeout=30)
    except Exception as e:
        return hub_error(e, "dataset")
    card = info.card_data.to_dict() if info.card_data is not None else {}
    configs = [c.get("config_name") for c in card.get("configs") or [] if isinstance(c, dict)]
    if config and configs and config not in configs:
        return f"the hub copy has no config '{config}' (it has {', '.join(configs)})"
    return None


def check_model(name):
    if HUB_DOWN:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(name, "config.json")
        return None if isinstance(cached, str) else ("no such local folder, the HF hub is unreachable, and the hub "
                                                     "cache holds no copy")
    from huggingface_hub import HfApi
    try:
        HfApi().model_info(name, timeout=30)
        return None
    except Exception as e:
        return "no such local folder, and " + hub_error(e, "model")


def hub_error(e, kind):
    text = " ".join(str(e).split())[:200]
    name = type(e).__name__
    if "RepositoryNotFound" in name or "404" in text:
        return f"no such {kind} on the HF hub"
    if "Gated" in name or "401" in text or "403" in text:
        return f"the HF hub refuses it ({text}): a gated {kind}? log in (hf auth login) or pass a local copy"
    return f"the HF hub did not answer ({name}: {text})"


def check_tiktoken():
    import socket
    import tempfile
    import tiktoken
    socket.setdefaulttimeout(30)
    try:
        tiktoken.get_encoding("gpt2")  # from its cache; online it downloads them once (~1.5 MB)
        return None
    except Exception as e:
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
            os.path.join(tempfile.gettempdir(), "data-gym-cache")  # tiktoken's default
        return f"not in tiktoken's cache ({cache}), and tiktoken could not download them ({type(e).__name__})"


# -----------------------------------------------------------------------------
# what each stage reads


def prepare_data(pf, stage, cfg):
    if stage.HF_DATASETS.get(cfg.source) and not cfg.data_path:
        repo, config = stage.HF_DATASETS[cfg.source]
        pf.hub_dataset(cfg.hf_dataset or repo, cfg.hf_config or config, "data_path=FILE|DIR|GLOB",
                       ".jsonl/.parquet rows or text files")
    elif cfg.data_path:
        pf.local("data_path", cfg.data_path)
    if cfg.tokenizer == "gpt2":
        pf.gpt2_ranks(cfg.tokenizer_file, pf.config)
    pf.makes(cfg.out_dir, kind=cfg.tokenizer)


def train_gpt(pf, stage, cfg):
    pf.upstream("data_dir", cfg.data_dir)
    if cfg.init_from != "scratch":
        pf.model("init_from", cfg.init_from)
    if cfg.hellaswag_file and not getattr(cfg, "bench", False):
        hellaswag_source(pf, "hellaswag_file", cfg.hellaswag_file)
    kind = pf.tokenizer_of(cfg.data_dir)[0] or cfg.tokenizer  # the data's, else the kind the config expects
    if kind == "gpt2":  # HellaSwag and the val bits per byte need the data's tokenizer
        pf.gpt2_ranks(cfg.tokenizer_file or "", pf.config)
    pf.makes(cfg.out_dir, kind=kind, tokenizer_file=cfg.tokenizer_file or "", config=pf.config)


def export_hf(pf, stage, cfg):
    pf.upstream("checkpoint", cfg.checkpoint)
    pf.native_ranks(cfg.checkpoint, cfg.tokenizer_file)
    pf.makes(cfg.output_dir)


def sft(pf, stage, cfg):
    from tasks import sft_sets, text_sets
    pf.model("model", cfg.model)
    pf.native_ranks(cfg.model, cfg.tokenizer_file)
    registry = text_sets if cfg.objective == "lm" else sft_sets
    for k, name in enumerate(cfg.datasets):
        try:
            entry = registry.get_set(name)
        except common.ConfigError as e:
            pf.errors.append(f"{pf.stage} ({pf.config}): {e}")
            continue
        eval_split = getattr(entry, "eval_split", None)
        path = cfg.data_paths[k] if k < len(cfg.data_paths) else ""
        eval_path = cfg.eval_data_paths[k] if k < len(cfg.eval_data_paths) else (path if eval_split is None else "")
        # eval: its own split, else a seeded holdout of the train rows (no copy of its own to pass)
        own_eval = cfg.eval_samples > 0 and (eval_split is not None or k < len(cfg.eval_data_paths))
        for key, p, used in (("data_paths", path, True), ("eval_data_paths", eval_path, own_eval)):
            if not used:
                continue
            if p:
                pf.local(key, p)
            elif entry.hub:
                files = "FILE" if len(cfg.datasets) == 1 else f"one FILE per dataset of {cfg.datasets}"
                pf.hub_dataset(entry.hub, entry.config, f"{key}=[{files}]",
                               f"the {name} split's rows in the hub's columns (.jsonl, .json, .parquet, .csv)")
    pf.makes(cfg.out_dir)


def grpo(pf, stage, cfg):
    from tasks import gsm8k, sft_sets
    pf.model("model", cfg.model)
    pf.native_ranks(cfg.model, cfg.tokenizer_file or "")
    if cfg.beta > 0 and cfg.ref_model:
        pf.model("ref_model", cfg.ref_model)
    if cfg.reward_model:
        pf.model("reward_model", cfg.reward_model)
    args = cfg.task_args or {}
    sources = {"gsm8k": (gsm8k.GSM8K_HUB, "main"), "svamp": (gsm8k.SVAMP_HUB, None)}
    if cfg.task.startswith("sft:"):
        try:
            entry = sft_sets.get_set(cfg.task[4:])
        except common.ConfigError as e:
            pf.errors.append(f"{pf.stage} ({pf.config}): {e}")
            return pf.makes(cfg.out_dir)
        sources[cfg.task] = (entry.hub, entry.config) if entry.hub else None
    if sources.get(cfg.task):
        repo, config = sources[cfg.task]
        for key in ("train_path", "test_path"):
            path = args.get(key, "")
            if path and path != repo:
                pf.local(f"task_args.{key}", path)
            else:
                pf.hub_dataset(repo, config, "task_args={train_path: FILE, test_path: FILE}")
    pf.makes(cfg.out_dir)


def eval_gsm8k(pf, stage, cfg):
    from tasks import gsm8k, hellaswag
    if cfg.task == "compare":
        return
    pf.model("model", cfg.model)
    pf.native_ranks(cfg.model, cfg.tokenizer_file)
    hub = {"gsm8k": (gsm8k.GSM8K_HUB, "main"), "svamp": (gsm8k.SVAMP_HUB, None), "hellaswag": (hellaswag.HUB, None)}
    for task in cfg.sweep_tasks if cfg.task == "sweep" else [cfg.task]:
        if task == "bpb" and cfg.bpb_text != "gsm8k":
            bpb_text_source(pf, cfg)
            continue
        task = "gsm8k" if task == "bpb" else task  # bpb_text=gsm8k: the GSM8K test split
        path, key = stage.task_data_path(cfg, task), stage.task_data_key(cfg, task)
        if task not in hub:
            continue  # synthetic, probes: generated
        repo, config = hub[task]
        if path and path != repo:
            pf.local(key, path)
        else:
            pf.hub_dataset(repo, config, f"{key}=FILE")
        if task in ("gsm8k", "svamp") and stage.fewshot_k(cfg) > 0:  # exemplars: GSM8K train
            beside = [os.path.join(os.path.dirname(os.path.abspath(p)), rel, "train.jsonl")
                      for p in (path, cfg.gsm8k_path) if p and p not in stage.HUB_SOURCES for rel in ("", "../gsm8k")]
            if cfg.fewshot_path and cfg.fewshot_path != gsm8k.GSM8K_HUB:
                pf.local("fewshot_path", cfg.fewshot_path)
            elif cfg.fewshot_path or not any(os.path.isfile(b) for b in beside):
                pf.hub_dataset(gsm8k.GSM8K_HUB, "main", "fewshot_path=FILE")
    pf.makes(cfg.out_dir)


def bpb_text_source(pf, cfg):
    """task=bpb on a text set: its local copy, else its hub dataset."""
    from tasks import text_sets
    entry = text_sets.get_set(cfg.bpb_text)
    if cfg.bpb_path or not entry.hub:
        pf.local("bpb_path", cfg.bpb_path)
    else:
        pf.hub_dataset(entry.hub, entry.config, "bpb_path=FILE")


def hellaswag_source(pf, key, path):
    from tasks import hellaswag
    if path == hellaswag.HUB:
        pf.hub_dataset(hellaswag.HUB, None, f"{key}=FILE")
    else:
        pf.local(key, path)


STAGES = {"prepare_data.py": prepare_data, "train_gpt.py": train_gpt, "export_hf.py": export_hf, "sft.py": sft,
          "grpo.py": grpo, "eval_gsm8k.py": eval_gsm8k}


# -----------------------------------------------------------------------------


def read_plan(path):
    """[(stage name, command words)] from pipeline.sh's plan file."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        words = f.read().split("\0")[:-1]
    plan, record = [], []
    for w in words:
        if w == RECORD_END:
            plan.append((record[0], record[1:]))
            record = []
        else:
            record.append(w)
    return plan


def check(plan):
    """(the lines of the message: one per missing input and per config a stage cannot read, warnings: the
    stages this script failed to check, which run unchecked)."""
    import importlib
    pf, warnings = Preflight(), []
    for name, words in plan:
        script = next((w for w in words if w.endswith(".py")), "")
        handler = STAGES.get(os.path.basename(script))
        if handler is None or not os.path.isfile(script):
            continue
        args = words[words.index(script) + 1:]
        try:
            stage = importlib.import_module(os.path.basename(script)[:-3])
        except Exception as e:
            pf.errors.append(f"{name}: {script} does not import ({type(e).__name__}: {e})")
            continue
        if not hasattr(stage, "Config"):
            continue  # a stage script of another shape: run unchecked
        pf.stage, pf.config = name, next((a for a in args if a.endswith((".yaml", ".yml"))), "")
        try:
            handler(pf, stage, common.load_config(stage.Config, args))
        except (common.ConfigError, ValueError, FileNotFoundError) as e:
            pf.errors.append(f"{name}: {' '.join(str(e).split())}")
        except Exception as e:  # this script's own mistake (a stage that changed its settings): not the user's
            warnings.append(f"warning: the preflight could not check {name} ({type(e).__name__}: {e}); it runs "
                            f"unchecked")
    return pf.problems(), warnings


def main(argv):
    global HUB_DOWN, common
    if len(argv) != 1:
        raise SystemExit("usage: python slurm/preflight.py PLAN")
    plan = read_plan(argv[0])
    if not plan:
        print("== preflight: every stage is complete or skipped, nothing to check")
        return 0
    HUB_DOWN = probe_hub()
    if HUB_DOWN:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    sys.path.insert(0, ROOT)
    import common as common_module  # after the probe: the HF libraries read the offline switches when imported
    common = common_module
    problems, warnings = check(plan)
    for w in warnings:
        print(w, file=sys.stderr)
    if problems:
        n = len(problems)
        hub = f"; the HF hub is unreachable: {HUB_DOWN}" if HUB_DOWN else ""
        print(f"error: {n} input{'s' if n > 1 else ''} of this launch {'are' if n > 1 else 'is'} missing (checked "
              f"before the first stage, nothing has run{hub}):\n" + "\n".join(f"  - {p}" for p in problems),
              file=sys.stderr)
        return 1
    print(f"== preflight: the inputs of {len(plan)} stage(s) are there")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
