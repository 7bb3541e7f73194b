"""The method study: does SFTMix (or S3FT) beat plain SFT here, and why?

    python benchmarks/study.py                 # the full study: SmolLM2-135M, 3 seeds per arm
    python benchmarks/study.py --report-only   # rewrite study.md and its plots from the runs so far
    python benchmarks/study.py --toy --out DIR --results DIR   # tiny random model, the test suite's run

What runs, in this order (each step through launch/*.py, like a user's job):
1. learning-rate sweep: NTP on the training set minus a validation split (balanced over
   generators), one run per --lrs value; the lowest final validation loss picks the rate
   every method then uses;
2. SFTMix's reference run (one epoch NTP, C=4 checkpoints, median split; seed 0): its split
   serves every sftmix arm and every seed, and partitions the training set into confident and
   unconfident halves whose gold-response loss every arm reports per epoch;
3. S3FT's targets, built once with the base model (greedy: the same for every seed);
4. the base model's accuracy; 5. per seed, every arm: training with the held-out perplexities
   after every epoch, then greedy accuracy on the in-domain and general sets.

Resumable across sessions: every finished step leaves a small JSON record under
RESULTS/study/ (committed with study.md), and a later invocation skips it; a killed training
job restarts from its start (runs keep no checkpoints). Heavy files (models, logs) go to --out.
Records from another design (model, sizes, epochs, learning rates, data) are refused.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "benchmarks", "study_data")
sys.path.insert(0, ROOT)
from sftmix_ds.common import atomic_file, write_json_atomic  # noqa: E402
from sftmix_ds.config import path_tag  # noqa: E402

# Arm -> the method overrides. {split} is the reference run's confidence file, {targets} S3FT's.
# Every arm packs its micro-batches (the same loss terms as padded ones, without the padding's compute).
ARMS = {"ntp": ["method=ntp"],
        "sftmix": ["method=sftmix", "method.confidence_file={split}"],
        "sftmix_mu0": ["method=sftmix", "method.confidence_file={split}", "method.mu=0"],
        "sftmix_random": ["method=sftmix", "method.confidence_source=random"],
        "sftmix_online": ["method=sftmix", "method.confidence_source=online"],
        "s3ft": ["method=s3ft", "method.targets_file={targets}"]}
ARM_LABELS = {"base": "base (no training)", "ntp": "ntp", "sftmix": "sftmix (reference split)",
              "sftmix_mu0": "sftmix, mu=0 (paired batches, no Mixup)", "sftmix_random": "sftmix (random split)",
              "sftmix_online": "sftmix (online split)", "s3ft": "s3ft"}
COLORS = {"base": "#8c8c8c", "ntp": "#4878a8", "sftmix": "#c44e52", "sftmix_mu0": "#dd8452",
          "sftmix_random": "#937860", "sftmix_online": "#8172b3", "s3ft": "#55a868"}
PPL_SETS = (("indomain_ppl", "in-domain (held out)"), ("unseen", "never-trained generators"),
            ("train_confident", "training set, confident half"),
            ("train_unconfident", "training set, unconfident half"))
BOOTSTRAP = 4000


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--train-size", type=int, default=256, help="balanced over the training generators")
    ap.add_argument("--val-size", type=int, default=48, help="the lr sweep's validation split, from the training set")
    ap.add_argument("--eval-size", type=int, default=0, help="accuracy on the first N questions per generator; 0: all")
    ap.add_argument("--ppl-size", type=int, default=20,
                    help="per-epoch perplexity on the first N examples per generator of the held-out sets, and "
                         "on 4N of each training half; 0: all")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lrs", default="3e-5,1e-4,3e-4", help="the NTP learning-rate sweep, comma separated")
    ap.add_argument("--micro-batch", type=int, default=16, help="= the global batch (one process)")
    ap.add_argument("--precision", default="bf16", help="train.precision (bf16: AMX on recent Xeons, GPUs)")
    ap.add_argument("--zero-stage", type=int, default=2, help="one process: ZeRO-2 skips ZeRO-3's gather hooks")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--arms", default=",".join(ARMS), help="comma separated, of " + ", ".join(ARMS))
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "study"))
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--report-only", action="store_true", help="no training: the report from the records so far")
    ap.add_argument("--toy", action="store_true", help="tiny random model, 16 examples, 1 seed, 2 epochs")
    args = ap.parse_args(argv)
    if args.toy:
        args.model, args.train_size, args.val_size, args.eval_size, args.ppl_size = "tiny", 16, 4, 2, 1
        args.epochs, args.seeds, args.lrs, args.micro_batch, args.max_new_tokens = 2, 1, "1e-4,3e-4", 4, 2
        args.precision = "fp32"
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        ap.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    args.lrs = [float(x) for x in args.lrs.split(",")]
    return args


# -- data ----------------------------------------------------------------------------------------

def read_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, records: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_file(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def per_task(records: list, n: int) -> list:
    """The first n records of each generator (task), in file order; n=0: all."""
    seen, out = defaultdict(int), []
    for r in records:
        if not n or seen[r["task"]] < n:
            seen[r["task"]] += 1
            out.append(r)
    return out


def balanced(records: list, size: int, what: str) -> list:
    tasks = sorted({r["task"] for r in records})
    if size % len(tasks):
        sys.exit(f"{what}={size}: must be a multiple of the {len(tasks)} generators ({', '.join(tasks)})")
    out = per_task(records, size // len(tasks))
    if len(out) != size:
        sys.exit(f"{what}={size}: {DATA} holds only {len(records)} examples; regenerate more with "
                 "benchmarks/study_data/make.py")
    return out


def prepare_data(args) -> dict:
    """The study's files under --out: training set, sweep split, evaluation subsets."""
    train = balanced(read_jsonl(os.path.join(DATA, "train.jsonl")), args.train_size, "--train-size")
    n_tasks = len({r["task"] for r in train})
    val_ids = {r["id"] for r in per_task(train[::-1], args.val_size // n_tasks)}  # the last of each generator
    if len(val_ids) != args.val_size or args.val_size % n_tasks:
        sys.exit(f"--val-size={args.val_size}: must be a multiple of {n_tasks} and below --train-size")
    files = {"train": train, "sweep_train": [r for r in train if r["id"] not in val_ids],
             "val": [r for r in train if r["id"] in val_ids]}
    for name in ("indomain", "unseen", "general"):
        files[name] = per_task(read_jsonl(os.path.join(DATA, f"{name}.jsonl")), args.eval_size)
    files["indomain_ppl"] = per_task(files["indomain"], args.ppl_size)
    files["unseen"] = per_task(files["unseen"], args.ppl_size)
    paths = {}
    for name, records in files.items():
        paths[name] = os.path.join(args.out, "data", f"{name}.jsonl")
        write_jsonl(paths[name], records)
    return paths


def design(args, paths: dict) -> dict:
    """What every record of a study shares; seeds and arms may grow."""
    h = hashlib.sha256()
    for name in sorted(paths):
        with open(paths[name], "rb") as f:
            h.update(name.encode() + f.read())
    return {"model": args.model, "train_size": args.train_size, "val_size": args.val_size,
            "eval_size": args.eval_size, "ppl_size": args.ppl_size, "epochs": args.epochs, "lrs": args.lrs,
            "micro_batch": args.micro_batch, "zero_stage": args.zero_stage, "precision": args.precision,
            "max_new_tokens": args.max_new_tokens, "data": h.hexdigest()[:16]}


def check_design(records_dir: str, current: dict) -> None:
    path = os.path.join(records_dir, "design.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items() if saved.get(k) != v]
        if changed:
            sys.exit(f"{records_dir} holds records of another study design ({'; '.join(changed)}); pass another "
                     "--results folder, or delete that one to start over")
    else:
        os.makedirs(records_dir, exist_ok=True)
        write_json_atomic(path, current, indent=1)


# -- running the steps ---------------------------------------------------------------------------

class Study:
    def __init__(self, args):
        self.args = args
        self.records = os.path.join(args.results, "study")
        self.paths = prepare_data(args)
        check_design(self.records, design(args, self.paths))
        self.split_file = os.path.join(self.records, "confidence.jsonl")
        self.targets_file = os.path.join(self.records, "s3ft_targets.jsonl")

    def record_path(self, name: str) -> str:
        return os.path.join(self.records, "steps", f"{name}.json")

    def done(self, name: str):
        path = self.record_path(name)
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return None

    def step(self, name: str, fn) -> dict:
        """fn()'s record, computed once: a finished step's record is read back."""
        found = self.done(name)
        if found is not None:
            return found
        if self.args.report_only:
            return None
        started = time.time()
        print(f"[study] {name} ...", flush=True)
        record = fn()
        record["wall_s"] = round(time.time() - started, 1)
        os.makedirs(os.path.dirname(self.record_path(name)), exist_ok=True)
        write_json_atomic(self.record_path(name), record, indent=1)
        print(f"[study] {name}: done in {record['wall_s']:.0f} s", flush=True)
        return record

    def launch(self, script: str, overrides: list, log_name: str) -> None:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}  # this checkout's library
        log_path = os.path.join(self.args.out, "logs", f"{log_name}.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *overrides], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode:
            with open(log_path) as f:
                tail = f.read()[-3000:]
            sys.exit(f"{script} {' '.join(overrides)} failed (exit {proc.returncode}; log {log_path}):\n{tail}")

    def common(self, lr: float, seed: int, train: str) -> list:
        a = self.args
        return [f"model={a.model}", "data=jsonl", "data.format=alpaca", "data.judge=numeric",
                f"data.train_files=[{train}]", f"train.epochs={a.epochs}", f"train.lr={lr}",
                f"train.micro_batch_size={a.micro_batch}", f"train.seed={seed}", f"train.precision={a.precision}",
                f"deepspeed=zero{a.zero_stage}" if a.zero_stage in (2, 3) else f"deepspeed.zero_stage={a.zero_stage}",
                "train.packing=true", "train.log_every=1", "train.eval_every=0", "train.save_every=0", "logger=none",
                "resume=auto"]

    def eval_overrides(self) -> list:
        p = self.paths
        return ["eval=arith", f"eval.tasks=[{{name:indomain,files:[{p['indomain']}],judge:numeric}}]",
                f"eval.general=[{{name:capitals,files:[{p['general']}],judge:contains}}]",
                "eval.perplexity_files=[]", f"eval.max_new_tokens={self.args.max_new_tokens}", "eval.batch_size=32"]

    # the steps

    def sweep(self) -> tuple:
        """(the chosen lr or None while a sweep run is missing, {lr: record})"""
        results = {}
        for lr in self.args.lrs:
            def run(lr=lr):
                out = os.path.join(self.args.out, f"sweep-lr{lr:g}")
                self.launch("train.py", self.common(lr, 0, self.paths["sweep_train"]) +
                            ["method=ntp", f"data.eval_files=[{self.paths['val']}]", "train.eval_each_epoch=true",
                             "train.export_final=false", f"output_dir={out}"],
                            f"sweep-lr{lr:g}")
                shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
                return {"lr": lr, "val_loss": [r["eval_loss"] for r in metrics(out)
                                               if "eval_loss" in r and float(r["epoch"]).is_integer()]}
            results[lr] = self.step(f"sweep-lr{lr:g}", run)
        if any(r is None for r in results.values()):
            return None, results
        return min(results, key=lambda lr: results[lr]["val_loss"][-1]), results

    def reference(self, lr: float) -> bool:
        """SFTMix stage 1 once (seed 0); its split is copied into the records. False: not run yet."""
        def run():
            out = os.path.join(self.args.out, "reference")
            self.launch("score.py", self.common(lr, 0, self.paths["train"]) +
                        ["method.confidence_source=reference", f"output_dir={out}"], "reference")
            found = [os.path.join(d, "confidence.jsonl") for d, _, files in os.walk(out) if "confidence.jsonl" in files]
            shutil.copyfile(found[0], self.split_file)
            return {"summary": json.load(open(os.path.join(os.path.dirname(found[0]), "summary.json")))}
        if self.step("reference", run) is None:
            return False
        if not os.path.exists(self.split_file):
            sys.exit(f"{self.split_file}: missing although steps/reference.json exists; delete that record to redo it")
        split = {r["id"]: r["split"] for r in read_jsonl(self.split_file)[1:]}
        train = read_jsonl(self.paths["train"])
        for half in ("confident", "unconfident"):
            self.paths[f"train_{half}"] = os.path.join(self.args.out, "data", f"train_{half}.jsonl")
            half_records = [r for r in train if split[r["id"]] == half]
            write_jsonl(self.paths[f"train_{half}"], half_records[:4 * self.args.ppl_size or None])
        return True

    def s3ft_targets(self, lr: float) -> None:
        def run():
            out = os.path.join(self.args.out, "s3ft_build")
            self.launch("s3ft_build.py", self.common(lr, 0, self.paths["train"]) +
                        [f"method.max_new_tokens={2 * self.args.max_new_tokens}", f"output_dir={out}"], "s3ft_build")
            shutil.copyfile(os.path.join(out, "s3ft", "targets.jsonl"), self.targets_file)
            return {"mix": json.load(open(os.path.join(out, "s3ft", "mix.json")))}
        self.step("s3ft_targets", run)

    def base(self) -> dict:
        def run():
            out = os.path.join(self.args.out, "base")
            self.launch("eval.py", [f"model={self.args.model}", f"train.precision={self.args.precision}",
                                    f"output_dir={out}", *self.eval_overrides()], "base")
            return {"accuracy": accuracy_record(os.path.join(out, "eval", "base", "eval.json"))}  # launch/eval.py
        return self.step("base", run)

    def arm(self, arm: str, seed: int, lr: float) -> dict:
        def run():
            out = os.path.join(self.args.out, f"{arm}-seed{seed}")
            p = self.paths
            sets = [f"+data.eval_sets.{name}=[{p[name]}]" for name, _ in PPL_SETS]
            method = [o.format(split=self.split_file, targets=self.targets_file) for o in ARMS[arm]]
            first = arm == "ntp" and seed == 0  # the base model's perplexities: epoch 0 of every curve
            self.launch("train.py", self.common(lr, seed, p["train"]) + method +
                        [*sets, "train.eval_each_epoch=true", f"train.eval_on_start={first}",
                         f"output_dir={out}", *self.eval_overrides()], f"{arm}-seed{seed}")
            evaluation = os.path.join(out, "eval", "eval.json")
            if not os.path.exists(evaluation):  # the model was there from an earlier, interrupted job
                self.launch("eval.py", [f"model={self.args.model}", f"train.precision={self.args.precision}",
                                        f"eval.model_path={out}/model", f"output_dir={out}", *self.eval_overrides()],
                            f"{arm}-seed{seed}-eval")
                evaluation = os.path.join(out, "eval", path_tag(f"{out}/model"), "eval.json")  # launch/eval.py's
            rows = metrics(out)
            return {"arm": arm, "seed": seed, "lr": lr, "accuracy": accuracy_record(evaluation),
                    "curves": curves(rows), "train_loss": epoch_train_loss(rows)}
        return self.step(f"{arm}-seed{seed}", run)

    def run(self) -> dict:
        """Every step not yet recorded (none with --report-only); returns what is recorded."""
        lr, sweep = self.sweep()
        found = {"sweep": sweep, "runs": {arm: [] for arm in self.args.arms}, "base": None, "reference": None,
                 "s3ft": None, "lr": lr}
        if lr is None:  # --report-only before the sweep finished
            return found
        if not self.reference(lr):
            return found
        found["reference"] = self.done("reference")
        if "s3ft" in self.args.arms:
            self.s3ft_targets(lr)
            found["s3ft"] = self.done("s3ft_targets")
        found["base"] = self.base()
        for seed in range(self.args.seeds):
            for arm in self.args.arms:
                if arm == "s3ft" and not os.path.exists(self.targets_file):
                    continue  # --report-only before the targets were built
                record = self.arm(arm, seed, lr)
                if record is not None:
                    found["runs"][arm].append(record)
        return found


def metrics(run_dir: str) -> list:
    return read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def curves(rows: list) -> list:
    """Per evaluated epoch: each held-out set's mean response-token NLL."""
    out = []
    for r in rows:
        found = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("eval_loss/")}
        if found and float(r["epoch"]).is_integer():
            out.append({"epoch": int(r["epoch"]), **found})
    return out


def epoch_train_loss(rows: list) -> list:
    """Mean training NTP loss of each epoch's steps (as logged: the batch's response tokens)."""
    by_epoch = defaultdict(list)
    for r in rows:
        if "step_s" in r:
            by_epoch[math.ceil(r["epoch"] - 1e-9)].append(r["loss/ntp"])
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


def accuracy_record(path: str) -> dict:
    with open(path) as f:
        e = json.load(f)
    return {"indomain": {x["id"]: x["correct"] for x in e["tasks"]["indomain"]["examples"]},
            "general": {x["id"]: x["correct"] for x in e["general"]["capitals"]["examples"]}}


# -- statistics ----------------------------------------------------------------------------------

def question_scores(runs: list, group: str) -> dict:
    """{question id: share of the runs (seeds) that answered it correctly}."""
    ids = list(runs[0]["accuracy"][group])
    return {q: sum(r["accuracy"][group][q] for r in runs) / len(runs) for q in ids}


def bootstrap_means(values: list, seed: int = 0):
    """BOOTSTRAP means of resamples (with replacement) of the values, sorted."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    return np.sort(v[np.random.default_rng(seed).integers(0, len(v), (BOOTSTRAP, len(v)))].mean(1))


def bootstrap_ci(values: list) -> tuple:
    """Mean and 95% percentile interval of the mean, resampling the values (questions)."""
    means = bootstrap_means(values)
    return sum(values) / len(values), float(means[int(0.025 * BOOTSTRAP)]), float(means[int(0.975 * BOOTSTRAP) - 1])


def difference_summary(mean: float, means) -> tuple:
    """(mean, 95% percentile interval, two-sided p) of a difference from its sorted bootstrap means."""
    p = 2 * min(int((means <= 0).sum()), int((means >= 0).sum())) / BOOTSTRAP
    return mean, float(means[int(0.025 * BOOTSTRAP)]), float(means[int(0.975 * BOOTSTRAP) - 1]), min(p, 1.0)


def paired_difference(arm: dict, ref: dict) -> tuple:
    """Mean per-question difference (arm - ref), its 95% interval and a two-sided bootstrap p."""
    diffs = [arm[q] - ref[q] for q in ref]
    return difference_summary(sum(diffs) / len(diffs), bootstrap_means(diffs))


def seed_question_difference(arm: list, ref: list, seed: int = 0) -> tuple:
    """Like paired_difference, but resampling seeds too: arm and ref are per-seed {question: correct}
    on the same seeds; each resample draws seeds and questions with replacement (both paired), so
    the interval also carries how far one arm's seeds differ (the question bootstrap alone does not)."""
    import numpy as np

    questions = list(ref[0])
    d = np.array([[float(a[q]) - float(r[q]) for q in questions] for a, r in zip(arm, ref)])  # seeds x questions
    rng = np.random.default_rng(seed)
    k, n = d.shape
    seed_counts = np.stack([np.bincount(row, minlength=k) for row in rng.integers(0, k, (BOOTSTRAP, k))])
    question_counts = np.stack([np.bincount(row, minlength=n) for row in rng.integers(0, n, (BOOTSTRAP, n))])
    return difference_summary(float(d.mean()), np.sort(((seed_counts @ d) * question_counts).sum(1) / (k * n)))


def mean_sd(values: list) -> tuple:
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def significance(d: tuple) -> str:
    mean, low, high, p = d
    verdict = "significant" if low > 0 or high < 0 else "not significant"
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}], p={p:.3f}: {verdict}"


def final_nll(runs: list, name: str) -> list:
    return [r["curves"][-1][name] for r in runs if r["curves"]]


def permutation_p(a: list, b: list) -> float:
    """Two-sided exact permutation p of the difference in means (seeds as the units): the share of
    all relabellings of a + b into groups of their sizes whose |difference| reaches the observed one."""
    from itertools import combinations

    pooled, observed = a + b, abs(sum(a) / len(a) - sum(b) / len(b))
    total = sum(pooled)
    diffs = [abs(sum(pick) / len(a) - (total - sum(pick)) / len(b))
             for pick in (tuple(pooled[i] for i in idx) for idx in combinations(range(len(pooled)), len(a)))]
    return sum(d >= observed - 1e-12 for d in diffs) / len(diffs)


def compare_perplexity(runs: dict, arm: str, ref: str, name: str) -> str:
    a, b = final_nll(runs[arm], name), final_nll(runs[ref], name)
    if not a or not b:
        return "not measured yet"
    pa, pb = [math.exp(x) for x in a], [math.exp(x) for x in b]
    (ma, sa), (mb, sb) = mean_sd(pa), mean_sd(pb)
    if min(len(pa), len(pb)) < 2:
        how = "one seed"
    elif max(pa) < min(pb):
        how = f"every seed below every {ref} seed"
    elif min(pa) > max(pb):
        how = f"every seed above every {ref} seed"
    else:
        how = "the seeds overlap"
    if min(len(pa), len(pb)) >= 2:
        how += f"; exact permutation p over seeds {permutation_p(pa, pb):.2f}"
    return f"{ma:.3f} ± {sa:.3f} vs {mb:.3f} ± {sb:.3f} ({how})"


def report(study: Study, found: dict) -> str:
    a = study.args
    runs = {arm: found["runs"][arm] for arm in a.arms if found["runs"][arm]}
    planned = len(a.arms) * a.seeds
    finished = sum(len(v) for v in runs.values())
    steps_dir = os.path.join(study.records, "steps")
    machine_s = sum(json.load(open(os.path.join(steps_dir, f)))["wall_s"] for f in sorted(os.listdir(steps_dir))) \
        if os.path.isdir(steps_dir) else 0.0
    train_n = len(read_jsonl(study.paths["train"]))
    sizes = {k: len(read_jsonl(study.paths[k])) for k in ("indomain", "general", "indomain_ppl", "unseen")}
    status = "complete" if finished == planned else (
        f"**partial**: {finished} of {planned} training runs finished; `python benchmarks/study.py` continues it")
    lines = [f"# Method study: {a.model}, {', '.join(a.arms)}", "",
             f"Status: {status}. Machine time of the recorded steps: {machine_s / 3600:.2f} h "
             f"({os.cpu_count()} CPU cores here).", "",
             "## Design", "",
             f"- Training set: {train_n} examples, balanced over basic_arithmetic, leg_counting, letter_counting and "
             "aiw (reasoning-gym, `benchmarks/study_data/`); every arm trains on it for "
             f"{a.epochs} epochs at one learning rate, micro-batch {a.micro_batch} (one process, "
             f"ZeRO-{a.zero_stage}, {a.precision}). SFTMix: mu = 0.2, alpha = 0.5, lambda per pair; reference run: "
             "one epoch NTP, C = 4 checkpoints, median split, seed 0, shared by every seed.",
             f"- Accuracy (greedy, at most {a.max_new_tokens} new tokens): {sizes['indomain']} held-out in-domain "
             f"questions (other seeds, no question of the training set) and {sizes['general']} capital-city "
             "questions (general ability; forgetting).",
             f"- Perplexity of the gold responses after every epoch: {sizes['indomain_ppl']} in-domain questions, "
             f"{sizes['unseen']} from generators no run trains on (spell_backward, sentence_reordering, "
             "calendar_arithmetic), and the first "
             f"{4 * a.ppl_size or 'all'} examples of each half of the reference run's split of the training set.",
             "- Statistics: accuracy pooled over seeds per question, 95% percentile bootstrap intervals over "
             f"questions ({BOOTSTRAP} resamples); each arm's difference from ntp by a paired bootstrap over the same "
             "questions, and again resampling the shared seeds as well (paired by seed); 'significant' means "
             "the interval excludes 0.", ""]
    sweep = {lr: r for lr, r in found["sweep"].items() if r}
    if sweep:
        lines += ["### Learning rate (NTP on the training set minus a validation split)", "",
                  "| lr | validation loss per epoch | |", "|---|---|---|"]
        for lr, r in sweep.items():
            chosen = "**chosen**" if lr == found["lr"] else ""
            lines.append(f"| {lr:g} | {', '.join(f'{x:.4f}' for x in r['val_loss'])} | {chosen} |")
        lines.append("")
    if os.path.exists(study.split_file):
        split = read_jsonl(study.split_file)[1:]
        by = {h: defaultdict(int) for h in ("confident", "unconfident")}
        for r in split:
            by[r["split"]][r["id"].rsplit("-", 2)[0]] += 1
        lines += ["Reference split by generator: " + "; ".join(
            f"{h}: " + ", ".join(f"{t} {n}" for t, n in sorted(c.items())) for h, c in by.items()) + ".", ""]
    if found["s3ft"]:
        share = found["s3ft"]["mix"]["share"]
        lines += [f"S3FT targets: own answers {100 * share['own']:.1f}%, judged paraphrases "
                  f"{100 * share['paraphrase']:.1f}%, gold {100 * share['gold']:.1f}%.", ""]
    if found["base"] is None:
        return "\n".join(lines) + "\n"

    scores = {"base": {g: question_scores([found["base"]], g) for g in ("indomain", "general")}}
    for arm, rs in runs.items():
        scores[arm] = {g: question_scores(rs, g) for g in ("indomain", "general")}
    def shared_seeds(arm: str, ref: str) -> list:
        return sorted({r["seed"] for r in runs[arm]} & {r["seed"] for r in runs[ref]})

    def paired(arm: str, ref: str, g: str) -> tuple:
        """arm - ref over the questions, on the seeds both have (a partial study compares like with like)."""
        if arm == "base" or ref == "base":
            return paired_difference(scores[arm][g], scores[ref][g])
        seeds = shared_seeds(arm, ref)
        pick = lambda a: question_scores([r for r in runs[a] if r["seed"] in seeds], g)
        return paired_difference(pick(arm), pick(ref))

    def paired_over_seeds(arm: str, ref: str, g: str):
        """arm - ref resampling the shared seeds (paired by seed) and the questions; None under 2 seeds."""
        seeds = shared_seeds(arm, ref)
        if len(seeds) < 2:
            return None
        pick = lambda a: [next(r for r in runs[a] if r["seed"] == s)["accuracy"][g] for s in seeds]
        return seed_question_difference(pick(arm), pick(ref))

    def differences(arm: str, ref: str, g: str) -> str:
        d = paired(arm, ref, g)
        text = significance(d)
        if arm != "base" and ref != "base":
            ds = paired_over_seeds(arm, ref, g)
            text += f"; resampling seeds too: {significance(ds)}" if ds else " (one shared seed: seeds not resampled)"
        return text

    lines += ["## Accuracy", "", "| arm | seeds | in-domain [95% CI] | vs ntp | general [95% CI] | vs ntp | "
              "per seed (in-domain / general) |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for arm in ["base", *runs]:
        cells = [ARM_LABELS[arm], "-" if arm == "base" else str(len(runs[arm]))]
        for g in ("indomain", "general"):
            m, lo, hi = bootstrap_ci(list(scores[arm][g].values()))
            summary[(arm, g)] = (m, lo, hi)
            cells.append(f"{m:.3f} [{lo:.3f}, {hi:.3f}]")
            if "ntp" in runs and arm != "ntp":
                d = paired(arm, "ntp", g)
                mark = " *" if d[1] > 0 or d[2] < 0 else ""
                ds = paired_over_seeds(arm, "ntp", g) if mark and arm != "base" else None
                mark += " †" if ds and (ds[1] > 0 or ds[2] < 0) else ""
                cells.append(f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" + mark)
            else:
                cells.append("")
        per_seed = [found["base"]] if arm == "base" else runs[arm]
        cells.append(", ".join(" / ".join(f"{sum(r['accuracy'][g].values()) / len(r['accuracy'][g]):.3f}"
                                          for g in ("indomain", "general")) for r in per_seed))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`*`: the paired 95% interval over questions excludes 0; `†`: it still does when the seeds are "
              "resampled too (paired by seed, at least 2 shared seeds; with 3 seeds a coarse but honest account "
              "of seed variance). Differences use the seeds both arms have.", "",
              "In-domain accuracy by generator:", ""]
    tasks = sorted({q.rsplit("-", 2)[0] for q in scores["base"]["indomain"]})
    lines += ["| arm | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for arm in ["base", *runs]:
        by = [[v for q, v in scores[arm]["indomain"].items() if q.rsplit("-", 2)[0] == t] for t in tasks]
        lines.append(f"| {arm} | " + " | ".join(f"{sum(v) / len(v):.3f}" for v in by) + " |")
    lines.append("")

    start = next((r["curves"][0] for r in runs.get("ntp", []) if r["curves"] and r["curves"][0]["epoch"] == 0), None)
    lines += ["## Perplexity of the gold responses, per epoch (mean ± sd over seeds)", "",
              "Epoch 0 is the base model (measured once)." if start else "", ""]
    for name, label in PPL_SETS:
        lines += [f"**{label}**", "", "| arm | " + " | ".join(f"epoch {e}" for e in range(a.epochs + 1)) + " |",
                  "|---|" + "---|" * (a.epochs + 1)]
        for arm, rs in runs.items():
            cells = [f"{math.exp(start[name]):.3f}" if start and name in start else "-"]
            for e in range(1, a.epochs + 1):
                vals = [math.exp(c[name]) for r in rs for c in r["curves"] if c["epoch"] == e and name in c]
                m, sd = mean_sd(vals) if vals else (float("nan"), 0.0)
                cells.append(f"{m:.3f} ± {sd:.3f}" if vals else "-")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Training NTP loss per epoch (the logged batch loss, mean over steps and seeds):", "",
              "| arm | " + " | ".join(f"epoch {e}" for e in range(1, a.epochs + 1)) + " |",
              "|---|" + "---|" * a.epochs]
    for arm, rs in runs.items():
        per = [mean_sd([r["train_loss"][e] for r in rs if len(r["train_loss"]) > e])[0] for e in range(a.epochs)]
        lines.append(f"| {arm} | " + " | ".join(f"{x:.4f}" for x in per) + " |")
    lines += ["", "## What the numbers say (generated from the records)", ""]
    for arm in runs:
        if arm == "ntp" or "ntp" not in runs:
            continue
        for g, label in (("indomain", "in-domain accuracy"), ("general", "general accuracy")):
            lines.append(f"- {arm} - ntp, {label}: {differences(arm, 'ntp', g)}.")
        lines.append(f"- {arm} vs ntp, final never-trained-generator perplexity: "
                     f"{compare_perplexity(runs, arm, 'ntp', 'unseen')}.")
    if {"ntp", "sftmix", "sftmix_mu0"} <= runs.keys():
        lines += ["", "Where a difference comes from (ntp -> sftmix mu=0: the paired batches; sftmix mu=0 -> "
                  "sftmix: the Mixup term; sftmix random -> sftmix: the confidence split):", ""]
        pairs = [("sftmix_mu0", "ntp", "paired batches"), ("sftmix", "sftmix_mu0", "Mixup term")]
        if "sftmix_random" in runs:
            pairs.append(("sftmix", "sftmix_random", "confidence split"))
        for arm, ref, what in pairs:
            lines.append(f"- {what} ({arm} - {ref}): in-domain accuracy {differences(arm, ref, 'indomain')}; "
                         f"general accuracy {differences(arm, ref, 'general')}; "
                         "final perplexity, never-trained generators "
                         f"{compare_perplexity(runs, arm, ref, 'unseen')}, in-domain "
                         f"{compare_perplexity(runs, arm, ref, 'indomain_ppl')}.")
    lines += ["", "## Reproduce", "", "```", "python benchmarks/study.py            # resumes from benchmarks/"
              "results/study/", "python benchmarks/study.py --report-only   # this file and the plots again",
              "```", "", "![accuracy](study_accuracy.png)", "", "![perplexity](study_perplexity.png)", ""]
    plot(study, runs, summary, start)
    return "\n".join(lines) + "\n"


def plot(study: Study, runs: dict, summary: dict, start) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    arms = ["base", *runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (g, title) in zip(axes, (("indomain", "in-domain accuracy"), ("general", "general accuracy (capitals)"))):
        ms = [summary[(arm, g)] for arm in arms]
        ax.bar(range(len(arms)), [m for m, _, _ in ms], yerr=[[m - lo for m, lo, _ in ms], [hi - m for m, _, hi in ms]],
               capsize=4, color=[COLORS[arm] for arm in arms])
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        ax.set_title(f"{title}, 95% CI")
    fig.tight_layout()
    fig.savefig(os.path.join(study.args.results, "study_accuracy.png"), dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(PPL_SETS), figsize=(4 * len(PPL_SETS), 3.6))
    for ax, (name, label) in zip(axes, PPL_SETS):
        for arm, rs in runs.items():
            epochs = list(range(0 if start else 1, study.args.epochs + 1))
            per = []
            for e in epochs:
                vals = [math.exp(start[name])] if e == 0 and start and name in start else \
                    [math.exp(c[name]) for r in rs for c in r["curves"] if c["epoch"] == e and name in c]
                per.append((min(vals), sum(vals) / len(vals), max(vals)) if vals else (math.nan,) * 3)
            ax.plot(epochs, [m for _, m, _ in per], marker="o", color=COLORS[arm], label=arm)
            ax.fill_between(epochs, [lo for lo, _, _ in per], [hi for _, _, hi in per], color=COLORS[arm], alpha=0.15)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")  # the base model's epoch 0 is far above the trained ones
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.set_xticks(range(study.args.epochs + 1))
    axes[0].set_ylabel("gold-response perplexity")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(study.args.results, "study_perplexity.png"), dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    study = Study(parse_args(argv))
    text = report(study, study.run())
    with open(os.path.join(study.args.results, "study.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
