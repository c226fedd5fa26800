"""
Evaluate a FishAI (or any Hugging Face causal) language model on MMLU, C-Eval,
HellaSwag, GSM8K and HumanEval, scored the way lm-evaluation-harness scores them.

Usage:
  # 5-shot MMLU from the Hugging Face hub (cais/mmlu)
  python evaluate.py --model checkpoints/fishai-best.pt --benchmark mmlu
  # everything, from local copies of the datasets (layout: see --help of --data-dir)
  python evaluate.py --model checkpoints/fishai-best.pt --benchmark all --data-dir ../shared/data \\
      --allow-code-execution --limit 50 --json results.json --log-samples samples.jsonl
  # the same again, replacing those two files (without --overwrite an existing file is refused)
  python evaluate.py --model checkpoints/fishai-best.pt --benchmark all --data-dir ../shared/data \\
      --allow-code-execution --limit 50 --json results.json --log-samples samples.jsonl --overwrite
  # a Hugging Face baseline, scored by the same code
  python evaluate.py --hf Qwen/Qwen2.5-0.5B --benchmark hellaswag,gsm8k --device cuda
  # HumanEval pass@1 and pass@10 from 20 samples per problem
  python evaluate.py --model ckpt.pt --benchmark humaneval --allow-code-execution --num-samples 20 --temperature 0.8
  # score a file of completions ({"task_id", "completion"} per line) without a model, as openai/human-eval does
  python evaluate.py --samples samples.jsonl --benchmark humaneval --data-dir data/ --allow-code-execution

Scoring (the same rules as lm-evaluation-harness):
  mmlu       k-shot (default 5, dev split, first k), "question / A. .. D. / Answer:", argmax of
             log p(" A".." D"); acc per subject and the size-weighted average; --limit is per subject.
  ceval      the same in Chinese (dev split as shots, val split scored); acc and acc_norm per subject,
             size-weighted per C-Eval category (STEM, Social Science, Humanities, Other) and overall.
  hellaswag  0-shot, the harness's text preprocessing, 4 endings: acc (summed log-likelihood) and
             acc_norm (log-likelihood / length of the ending in characters).
  gsm8k      8-shot chain of thought "Question: ..\\nAnswer: ..", greedy, stop at "Question:";
             exact_match with the strict ("#### N") and flexible (last number) extraction.
  humaneval  completion of the prompt, Codex stop sequences, execution of the problem's tests in a
             sandboxed subprocess (only with --allow-code-execution); pass@1 (greedy) or pass@k with
             the unbiased estimator of Chen et al. (2021) from --num-samples n --temperature t.

Log-likelihood scoring and generation go through benchmark.py (load_lm, LM, loglikelihood), the
same code reference_benchmark.py uses, so FishAI checkpoints and HF baselines are scored alike.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import data_utils as du

BENCHMARKS = ("mmlu", "ceval", "hellaswag", "gsm8k", "humaneval")
DEFAULT_FEWSHOT = {"mmlu": 5, "ceval": 5, "hellaswag": 0, "gsm8k": 8, "humaneval": 0}
DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 256, "humaneval": 512}
DEFAULT_MODEL = "checkpoints/fishai-best.pt"  # what train.py writes

DATA_DIR_LAYOUT = """\
DIR/mmlu/dev/<subject>_dev.csv, DIR/mmlu/test/<subject>_test.csv   (no header: question,A,B,C,D,answer)
DIR/ceval/dev/<subject>_dev.csv, DIR/ceval/val/<subject>_val.csv   (header: id,question,A,B,C,D,answer[,explanation])
DIR/hellaswag/hellaswag_val*.jsonl [+ hellaswag_train.jsonl for shots]  (rowanz/hellaswag jsonl)
DIR/gsm8k/test.jsonl [+ train.jsonl for shots]                     (question, answer)
DIR/humaneval/HumanEval.jsonl[.gz]                                 (task_id, prompt, canonical_solution, test, entry_point)"""
SEE_LAYOUT = "see the --data-dir layout in `python evaluate.py --help`"


class EvalError(du.FishAIError):
    """A bad input (file, column, flag): the message names it and says what to do."""


def build_parser() -> du.ArgumentParser:
    p = du.ArgumentParser(
        description="Evaluate a model on MMLU, C-Eval, HellaSwag, GSM8K and HumanEval\n"
                    "(lm-evaluation-harness scoring).",
        epilog="--data-dir layout (the datasets' original formats):\n" + DATA_DIR_LAYOUT)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="FishAI checkpoint (.pt), quantized export (.bin) or FishAI HF dir "
                     f"(default {DEFAULT_MODEL} when neither --hf nor --samples is given)")
    src.add_argument("--hf", metavar="NAME_OR_DIR", help="any Hugging Face causal LM (hub name or local dir)")
    src.add_argument("--samples", metavar="FILE.jsonl",
                     help="HumanEval only: score these completions ({task_id, completion} per line) without a model")
    p.add_argument("--benchmark", required=True,
                   help="mmlu | ceval | hellaswag | gsm8k | humaneval | all (or a comma-separated list)")
    p.add_argument("--data-dir", help="local dataset copies (layout below); default: the HF hub by name")
    p.add_argument("--limit", type=du.int_flag(1), help="score only the first N documents (per subject for mmlu/ceval)")
    p.add_argument("--num-fewshot", type=du.int_flag(0),
                   help="shots (default: " + ", ".join(f"{b} {k}" for b, k in DEFAULT_FEWSHOT.items()) + ")")
    p.add_argument("--batch-size", type=du.int_flag(1), default=8, help="log-likelihood batch size")
    du.add_device_flag(p)
    du.add_dtype_flag(p, "model dtype (default auto: bf16 on CUDA, fp16 where bf16 is unsupported, fp32 elsewhere)")
    p.add_argument("--seed", type=du.int_flag(0), default=1234, help="seed for sampling")
    p.add_argument("--max-new-tokens", type=du.int_flag(1),
                   help="tokens to generate per answer (default: " +
                        ", ".join(f"{b} {n}" for b, n in DEFAULT_MAX_NEW_TOKENS.items()) + ")")
    p.add_argument("--max-gen-toks", dest="max_new_tokens", type=du.int_flag(1), help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="PATH", help="write per-task metrics (harness metric names, n) here")
    p.add_argument("--log-samples", metavar="PATH",
                   help="write every prompt, target and model answer as JSON lines here")
    du.add_overwrite_flag(p, "existing --json / --log-samples files")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="HumanEval: allow executing model-written code (sandboxed subprocess, timeout, rlimits)")
    p.add_argument("--num-samples", type=du.int_flag(1), default=1,
                   help="HumanEval samples per problem; 1 decodes greedily")
    p.add_argument("--temperature", type=du.float_flag(0), default=0.0,
                   help="HumanEval sampling temperature (default 0: greedy)")
    p.add_argument("--exec-timeout", type=du.float_flag(0, lo_open=True), default=10.0,
                   help="seconds per HumanEval program")
    p.add_argument("--exec-memory-mb", type=du.int_flag(64), default=1024, help="address-space limit per program in MB")
    p.add_argument("--exec-workers", type=du.int_flag(1), help="programs run in parallel (default: CPU count, max 8)")
    du.add_quiet_flag(p)
    return p


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags answer before torch is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import benchmark  # noqa: E402
import model as fishai  # noqa: E402

HF_DATASETS = {
    "mmlu": ("cais/mmlu", "all"),
    "ceval": ("ceval/ceval-exam", "<subject>"),
    "hellaswag": ("Rowan/hellaswag", None),
    "gsm8k": ("openai/gsm8k", "main"),
    "humaneval": ("openai/openai_humaneval", None),
}
LETTERS = ("A", "B", "C", "D")

# MMLU subject -> category, as lm-evaluation-harness groups them (mmlu_stem, mmlu_humanities, ...).
MMLU_SUBJECTS = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem", "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem", "high_school_us_history": "humanities",
    "high_school_world_history": "humanities", "human_aging": "other", "human_sexuality": "social_sciences",
    "international_law": "humanities", "jurisprudence": "humanities", "logical_fallacies": "humanities",
    "machine_learning": "stem", "management": "other", "marketing": "other", "medical_genetics": "other",
    "miscellaneous": "other", "moral_disputes": "humanities", "moral_scenarios": "humanities",
    "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences", "virology": "other", "world_religions": "humanities",
}

# C-Eval subject -> (Chinese name, category), from C-Eval's subject_mapping.json.
CEVAL_SUBJECTS = {
    "computer_network": ("计算机网络", "STEM"), "operating_system": ("操作系统", "STEM"),
    "computer_architecture": ("计算机组成", "STEM"), "college_programming": ("大学编程", "STEM"),
    "college_physics": ("大学物理", "STEM"), "college_chemistry": ("大学化学", "STEM"),
    "advanced_mathematics": ("高等数学", "STEM"), "probability_and_statistics": ("概率统计", "STEM"),
    "discrete_mathematics": ("离散数学", "STEM"), "electrical_engineer": ("注册电气工程师", "STEM"),
    "metrology_engineer": ("注册计量师", "STEM"), "high_school_mathematics": ("高中数学", "STEM"),
    "high_school_physics": ("高中物理", "STEM"), "high_school_chemistry": ("高中化学", "STEM"),
    "high_school_biology": ("高中生物", "STEM"), "middle_school_mathematics": ("初中数学", "STEM"),
    "middle_school_biology": ("初中生物", "STEM"), "middle_school_physics": ("初中物理", "STEM"),
    "middle_school_chemistry": ("初中化学", "STEM"), "veterinary_medicine": ("兽医学", "STEM"),
    "college_economics": ("大学经济学", "Social Science"), "business_administration": ("工商管理", "Social Science"),
    "marxism": ("马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("教育学", "Social Science"), "teacher_qualification": ("教师资格", "Social Science"),
    "high_school_politics": ("高中政治", "Social Science"), "high_school_geography": ("高中地理", "Social Science"),
    "middle_school_politics": ("初中政治", "Social Science"),
    "middle_school_geography": ("初中地理", "Social Science"),
    "modern_chinese_history": ("近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("思想道德修养与法律基础", "Humanities"),
    "logic": ("逻辑学", "Humanities"), "law": ("法学", "Humanities"),
    "chinese_language_and_literature": ("中国语言文学", "Humanities"), "art_studies": ("艺术学", "Humanities"),
    "professional_tour_guide": ("导游资格", "Humanities"), "legal_professional": ("法律职业资格", "Humanities"),
    "high_school_chinese": ("高中语文", "Humanities"), "high_school_history": ("高中历史", "Humanities"),
    "middle_school_history": ("初中历史", "Humanities"), "civil_servant": ("公务员", "Other"),
    "sports_science": ("体育学", "Other"), "plant_protection": ("植物保护", "Other"),
    "basic_medicine": ("基础医学", "Other"), "clinical_medicine": ("临床医学", "Other"),
    "urban_and_rural_planner": ("注册城乡规划师", "Other"), "accountant": ("注册会计师", "Other"),
    "fire_engineer": ("注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": ("环境影响评价工程师", "Other"),
    "tax_accountant": ("税务师", "Other"), "physician": ("医师资格", "Other"),
}

# GSM8K few-shot exemplars used when the training split is not available (no hub access and no
# DIR/gsm8k/train.jsonl). Written for this project in the GSM8K answer format (worked steps with
# <<calculator>> annotations, final "#### N"); they are NOT taken from the GSM8K test set.
GSM8K_FEWSHOT = [
    ("Maria buys 3 packs of pencils. Each pack has 12 pencils. She gives 9 pencils to her brother. "
     "How many pencils does she have left?",
     "Maria buys 3 * 12 = <<3*12=36>>36 pencils.\nAfter giving 9 away she has 36 - 9 = <<36-9=27>>27 "
     "pencils left.\n#### 27"),
    ("A bakery sells muffins for $2 each and cookies for $1 each. On Monday it sold 45 muffins and "
     "60 cookies. How much money did the bakery make on Monday?",
     "The muffins made 45 * 2 = $<<45*2=90>>90.\nThe cookies made 60 * 1 = $<<60*1=60>>60.\n"
     "In total the bakery made 90 + 60 = $<<90+60=150>>150.\n#### 150"),
    ("Tom reads 15 pages of a book every day. The book has 240 pages. How many days will it take Tom "
     "to finish the book?",
     "Tom needs 240 / 15 = <<240/15=16>>16 days to finish the book.\n#### 16"),
    ("A farmer has 8 rows of apple trees with 14 trees in each row. Each tree gives 20 apples. "
     "How many apples does the farmer harvest?",
     "The farmer has 8 * 14 = <<8*14=112>>112 trees.\nThey give 112 * 20 = <<112*20=2240>>2240 apples.\n"
     "#### 2240"),
    ("Lena had $50. She spent one fifth of it on a book and then $12 on lunch. How much money does "
     "she have now?",
     "The book cost 50 / 5 = $<<50/5=10>>10.\nThe book and lunch cost 10 + 12 = $<<10+12=22>>22.\n"
     "She has 50 - 22 = $<<50-22=28>>28 left.\n#### 28"),
    ("A train travels at 60 miles per hour for 2 hours and then at 45 miles per hour for 3 hours. "
     "How many miles does it travel in total?",
     "First it travels 60 * 2 = <<60*2=120>>120 miles.\nThen it travels 45 * 3 = <<45*3=135>>135 miles.\n"
     "In total it travels 120 + 135 = <<120+135=255>>255 miles.\n#### 255"),
    ("There are 24 students in a class. Half of them play soccer, and a third of the soccer players "
     "also play basketball. How many students play both soccer and basketball?",
     "Half of the class is 24 / 2 = <<24/2=12>>12 soccer players.\nA third of them is 12 / 3 = "
     "<<12/3=4>>4 students who play both.\n#### 4"),
    ("A shop sells a jacket for $80. During a sale the price is reduced by 25%. Sam buys 2 jackets "
     "during the sale. How much does he pay?",
     "The discount is 80 * 25 / 100 = $<<80*25/100=20>>20.\nThe sale price is 80 - 20 = $<<80-20=60>>60.\n"
     "Two jackets cost 2 * 60 = $<<2*60=120>>120.\n#### 120"),
]

GSM8K_STOP = ["Question:", "</s>", "<|im_end|>", "<|endoftext|>"]
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # Codex paper / openai human-eval
GSM8K_STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE_RES = [re.compile(p) for p in (r",", r"\$", r"(?s).*#### ", r"\.$")]
INVALID = "[invalid]"


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Data loading: local files in each dataset's original format, or the HF hub by name
# --------------------------------------------------------------------------------------------

def _hf_load(name: str, config: str | None, split: str):
    """data_utils.load_hf_dataset (offline-aware), with the --data-dir hint."""
    try:
        return du.load_hf_dataset(name, config, split=split)
    except du.DataError as e:
        raise EvalError(f"{e} (or pass --data-dir DIR with local copies in the datasets' original formats)") from None


def _read_csv_rows(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [row for row in csv.reader(f)]
    except UnicodeDecodeError:
        raise EvalError(f"{path}: not UTF-8 text; expected a CSV file") from None
    except csv.Error as e:
        raise EvalError(f"{path}: not a valid CSV file ({e})") from None


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalError(f"{path}:{i}: not valid JSON ({e.msg}); expected one JSON object per line") from None
                if not isinstance(row, dict):
                    raise EvalError(f"{path}:{i}: expected a JSON object per line, got {type(row).__name__}")
                rows.append(row)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise EvalError(f"{path}: cannot read it as JSON lines ({type(e).__name__})") from None
    return rows


def _require_keys(path, i, row: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise EvalError(f"{path}:{i}: missing field(s) {', '.join(missing)}; expected fields: {', '.join(keys)}")


def _answer_index(path, where, letter) -> int:
    letter = str(letter).strip()
    if letter not in LETTERS:
        raise EvalError(f"{path}:{where}: answer {letter!r} is not one of A, B, C, D")
    return LETTERS.index(letter)


def _split_dir(data_dir: Path, bench: str, split: str, needed_for: str) -> Path:
    d = data_dir / bench / split
    if not d.is_dir():
        raise EvalError(f"missing split: {d} does not exist (needed for {needed_for}); "
                        f"{SEE_LAYOUT}")
    return d


def read_mmlu_csv(path: Path, subject: str) -> list[dict]:
    """One MMLU CSV in the original hendrycks/test format: no header; question,A,B,C,D,answer."""
    docs = []
    for i, row in enumerate(_read_csv_rows(path), 1):
        if i == 1 and [c.strip().lower() for c in row] == ["question", "a", "b", "c", "d", "answer"]:
            continue  # tolerate a header line some re-exports add
        if len(row) != 6:
            raise EvalError(f"{path}: row {i} has {len(row)} columns; expected 6 without a header: "
                            f"question,A,B,C,D,answer (letter)")
        docs.append({"subject": subject, "question": row[0], "choices": row[1:5],
                     "answer": _answer_index(path, f"row {i}", row[5])})
    if not docs:
        raise EvalError(f"{path}: no rows; expected question,A,B,C,D,answer lines")
    return docs


def read_ceval_csv(path: Path, subject: str) -> list[dict]:
    """One C-Eval CSV (ceval/ceval-exam): header id,question,A,B,C,D,answer[,explanation]."""
    rows = _read_csv_rows(path)
    expected = ("id", "question", "A", "B", "C", "D", "answer")
    if not rows:
        raise EvalError(f"{path}: empty file; expected a header {','.join(expected)}")
    header = [h.strip().lstrip("\ufeff") for h in rows[0]]
    missing = [c for c in expected if c not in header]
    if missing:
        raise EvalError(f"{path}: missing column(s) {', '.join(missing)}; expected a header with "
                        f"{','.join(expected)}[,explanation]")
    col = {c: header.index(c) for c in header}
    docs = []
    for i, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise EvalError(f"{path}: line {i} has {len(row)} columns, the header has {len(header)}")
        docs.append({"subject": subject, "question": row[col["question"]],
                     "choices": [row[col[c]] for c in LETTERS],
                     "answer": _answer_index(path, f"line {i}", row[col["answer"]])})
    return docs


def _subjects_in(d: Path, suffix: str) -> list[str]:
    return sorted(p.name[: -len(suffix)] for p in d.glob(f"*{suffix}"))


def load_mmlu(data_dir=None, need_dev: bool = True) -> dict[str, tuple[list[dict], list[dict]]]:
    """subject -> (test docs, dev docs). Docs: {subject, question, choices[4], answer (0-3)}."""
    out: dict[str, tuple[list, list]] = {}
    if data_dir is not None:
        test_dir = _split_dir(Path(data_dir), "mmlu", "test", "MMLU scoring")
        subjects = _subjects_in(test_dir, "_test.csv")
        if not subjects:
            raise EvalError(f"{test_dir}: no <subject>_test.csv files; {SEE_LAYOUT}")
        dev_dir = _split_dir(Path(data_dir), "mmlu", "dev", "the few-shot examples; or pass --num-fewshot 0") \
            if need_dev else None
        for s in subjects:
            dev = []
            if dev_dir is not None:
                p = dev_dir / f"{s}_dev.csv"
                if not p.is_file():
                    raise EvalError(f"missing split: {p} (few-shot examples for {s}); or pass --num-fewshot 0")
                dev = read_mmlu_csv(p, s)
            out[s] = (read_mmlu_csv(test_dir / f"{s}_test.csv", s), dev)
        return out
    name, config = HF_DATASETS["mmlu"]
    splits = {sp: _hf_load(name, config, sp) for sp in (("test", "dev") if need_dev else ("test",))}
    for sp, ds in splits.items():
        for i, r in enumerate(ds):
            _require_keys(f"{name}[{sp}]", i, r, ("question", "subject", "choices", "answer"))
            doc = {"subject": r["subject"], "question": r["question"], "choices": list(r["choices"]),
                   "answer": int(r["answer"])}
            out.setdefault(r["subject"], ([], []))[0 if sp == "test" else 1].append(doc)
    return dict(sorted(out.items()))


def load_ceval(data_dir=None, need_dev: bool = True) -> dict[str, tuple[list[dict], list[dict]]]:
    """subject -> (val docs, dev docs); the test split's labels are hidden, so val is scored."""
    out = {}
    if data_dir is not None:
        val_dir = _split_dir(Path(data_dir), "ceval", "val", "C-Eval scoring")
        subjects = _subjects_in(val_dir, "_val.csv")
        if not subjects:
            raise EvalError(f"{val_dir}: no <subject>_val.csv files; {SEE_LAYOUT}")
        dev_dir = _split_dir(Path(data_dir), "ceval", "dev", "the few-shot examples; or pass --num-fewshot 0") \
            if need_dev else None
        for s in subjects:
            if s not in CEVAL_SUBJECTS:
                raise EvalError(f"{val_dir / (s + '_val.csv')}: unknown C-Eval subject {s!r}; "
                                f"expected one of the 52 ceval-exam subjects")
            dev = []
            if dev_dir is not None:
                p = dev_dir / f"{s}_dev.csv"
                if not p.is_file():
                    raise EvalError(f"missing split: {p} (few-shot examples for {s}); or pass --num-fewshot 0")
                dev = read_ceval_csv(p, s)
            out[s] = (read_ceval_csv(val_dir / f"{s}_val.csv", s), dev)
        return out
    name = HF_DATASETS["ceval"][0]
    for s in CEVAL_SUBJECTS:
        parts = []
        for sp in ("val", "dev") if need_dev else ("val",):
            docs = []
            for i, r in enumerate(_hf_load(name, s, sp)):
                _require_keys(f"{name}/{s}[{sp}]", i, r, ("question", "A", "B", "C", "D", "answer"))
                docs.append({"subject": s, "question": r["question"], "choices": [r[c] for c in LETTERS],
                             "answer": _answer_index(f"{name}/{s}[{sp}]", i, r["answer"])})
            parts.append(docs)
        out[s] = (parts[0], parts[1] if need_dev else [])
    return dict(sorted(out.items()))


HELLASWAG_KEYS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")


def _check_hellaswag(path, rows):
    for i, r in enumerate(rows, 1):
        _require_keys(path, i, r, HELLASWAG_KEYS)
        if not isinstance(r["endings"], list) or len(r["endings"]) != 4:
            raise EvalError(f"{path}:{i}: 'endings' must be a list of 4 strings")
        try:
            label = int(r["label"])
        except (TypeError, ValueError):
            raise EvalError(f"{path}:{i}: 'label' must be 0-3, got {r['label']!r}") from None
        if not 0 <= label <= 3:
            raise EvalError(f"{path}:{i}: 'label' must be 0-3, got {label}")
        r["label"] = label
    return rows


def load_hellaswag(data_dir=None, split: str = "validation") -> list[dict]:
    """Rows in the rowanz/hellaswag form (activity_label, ctx_a, ctx_b, endings[4], label int)."""
    if data_dir is not None:
        d = Path(data_dir) / "hellaswag"
        stem = "hellaswag_val" if split == "validation" else "hellaswag_train"
        files = sorted(d.glob(f"{stem}*.jsonl")) + sorted(d.glob(f"{stem}*.jsonl.gz"))
        exact = [p for p in files if p.name.split(".")[0] == stem]
        files = exact or files  # prefer the full split over a subset file
        if not files:
            raise EvalError(f"missing split: no {d}/{stem}*.jsonl (HellaSwag {split}); "
                            + ("or pass --num-fewshot 0" if split == "train" else SEE_LAYOUT))
        return _check_hellaswag(files[0], _read_jsonl(files[0]))
    name = HF_DATASETS["hellaswag"][0]
    rows = [dict(r) for r in _hf_load(name, None, split)]
    return _check_hellaswag(f"{name}[{split}]", rows)


def load_gsm8k(data_dir=None, split: str = "test") -> list[dict]:
    """GSM8K rows {question, answer}; answer ends with '#### N'."""
    if data_dir is not None:
        p = Path(data_dir) / "gsm8k" / f"{split}.jsonl"
        if not p.is_file():
            raise EvalError(f"missing split: {p} (GSM8K {split})")
        rows = _read_jsonl(p)
    else:
        name, config = HF_DATASETS["gsm8k"]
        p = f"{name}[{split}]"
        rows = [dict(r) for r in _hf_load(name, config, split)]
    for i, r in enumerate(rows, 1):
        _require_keys(p, i, r, ("question", "answer"))
        if "####" not in r["answer"]:
            raise EvalError(f"{p}:{i}: 'answer' has no '#### N' final answer; expected the GSM8K format")
    return rows


HUMANEVAL_KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def load_humaneval(data_dir=None) -> list[dict]:
    if data_dir is not None:
        d = Path(data_dir) / "humaneval"
        p = next((q for q in (d / "HumanEval.jsonl", d / "HumanEval.jsonl.gz") if q.is_file()), None)
        if p is None:
            raise EvalError(f"missing file: {d}/HumanEval.jsonl (or .jsonl.gz); {SEE_LAYOUT}")
        rows = _read_jsonl(p)
    else:
        name = HF_DATASETS["humaneval"][0]
        p = f"{name}[test]"
        rows = [dict(r) for r in _hf_load(name, None, "test")]
    for i, r in enumerate(rows, 1):
        _require_keys(p, i, r, HUMANEVAL_KEYS)
    return rows


# --------------------------------------------------------------------------------------------
# Prompts (lm-evaluation-harness templates)
# --------------------------------------------------------------------------------------------

def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def ceval_description(subject: str) -> str:
    return f"以下是中国关于{CEVAL_SUBJECTS.get(subject, (subject,))[0]}考试的单项选择题，请选出其中的正确答案。\n\n"


def mc_question(doc: dict, answer_cue: str) -> str:
    """'question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:' (cue '答案：' for C-Eval)."""
    lines = [doc["question"].strip()] + [f"{L}. {c}" for L, c in zip(LETTERS, doc["choices"])]
    return "\n".join(lines) + "\n" + answer_cue


def hellaswag_preprocess(text: str) -> str:
    """The harness's cleanup; the brackets are WikiHow artifacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_doc(row: dict) -> dict:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"query": hellaswag_preprocess(row["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in row["endings"]], "gold": int(row["label"])}


def gsm8k_question(q: str) -> str:
    return f"Question: {q}\nAnswer:"


def fewshot_context(description: str, shots: list[str], query: str) -> str:
    """description + shots joined by the harness's fewshot delimiter '\\n\\n' + query."""
    return description + "".join(s + "\n\n" for s in shots) + query


# --------------------------------------------------------------------------------------------
# Answer extraction and metrics
# --------------------------------------------------------------------------------------------

def regex_extract(text: str, pattern: re.Pattern, group_select: int = 0) -> str:
    """lm-eval RegexFilter: pick match `group_select`; with alternation groups, the non-empty one."""
    matches = pattern.findall(text)
    if not matches:
        return INVALID
    m = matches[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), INVALID)
    return m.strip()


def extract_strict(text: str) -> str:
    """The number after the first '#### ' (the GSM8K answer format), or '[invalid]'."""
    return regex_extract(text, GSM8K_STRICT_RE, 0)


def extract_flexible(text: str) -> str:
    """The last number in the text, or '[invalid]'."""
    return regex_extract(text, GSM8K_FLEXIBLE_RE, -1)


def normalize_answer(s: str) -> str:
    """exact_match's regexes_to_ignore for gsm8k (',', '$', everything up to '#### ', a final '.'), lower case."""
    for r in GSM8K_IGNORE_RES:
        s = r.sub("", s)
    return s.strip().lower()


def gsm8k_exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n-c, k) / C(n, k), in a numerically stable form."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_stderr(xs) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    if len(a) == 0:
        return float("nan"), float("nan")
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else None  # None: valid JSON
    return float(a.mean()), se


# --------------------------------------------------------------------------------------------
# Sandboxed execution of HumanEval programs
# --------------------------------------------------------------------------------------------

# Runs inside the child before the program: disables the functions most likely to damage the host
# (the same list as openai/human-eval's reliability_guard). This is not a security boundary; the
# real limits are the separate process, rlimits, temp cwd, empty environment and the timeout.
_GUARD = r'''
import builtins, faulthandler, os, shutil, subprocess, sys
faulthandler.disable()
_exit = os._exit
_src = open("program.py", encoding="utf-8").read()
os.environ.clear()
for _n in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
           "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
           "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "chdir", "execv", "execve",
           "spawnv", "posix_spawn", "popen"):
    if hasattr(os, _n):
        setattr(os, _n, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = subprocess.run = subprocess.call = None
builtins.help = None
for _m in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_m] = None
try:
    exec(compile(_src, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except BaseException as _e:  # SystemExit too: a program that exits early has not passed its tests
    import traceback
    sys.stderr.write(traceback.format_exception_only(type(_e), _e)[-1])
    sys.stderr.flush()
    _exit(1)
'''


def _limits(cpu_seconds: int, memory_bytes: int):
    """preexec_fn: runs in the child between fork and exec, so only the child is limited."""
    def apply():
        import resource
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


@dataclass
class _Job:
    key: object
    program: str
    proc: subprocess.Popen | None = None
    tmp: tempfile.TemporaryDirectory | None = None
    deadline: float = 0.0
    result: str = ""


def _start(job: _Job, timeout: float, memory_mb: int) -> None:
    job.tmp = tempfile.TemporaryDirectory(prefix="fishai-exec-")
    d = job.tmp.name
    Path(d, "program.py").write_text(job.program, encoding="utf-8")
    Path(d, "guard.py").write_text(_GUARD, encoding="utf-8")
    # A minimal environment: nothing inherited (no tokens, keys or proxies from the parent).
    env = {"PATH": "/usr/bin:/bin", "HOME": d, "TMPDIR": d, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    with open(Path(d, "stderr.txt"), "wb") as err:
        # -I: isolated (ignores PYTHON* variables and user site-packages); -S: no site-packages at all.
        job.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "guard.py"], cwd=d, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err, close_fds=True, start_new_session=True,
            preexec_fn=_limits(int(math.ceil(timeout)) + 1, memory_mb << 20))
    job.deadline = time.monotonic() + timeout


def _finish(job: _Job, rc: int | None) -> None:
    if rc is None:  # timed out: kill the whole process group the program may have started
        try:
            os.killpg(job.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.proc.wait()
        job.result = "timed out"
    elif rc == 0:
        job.result = "passed"
    else:
        err = Path(job.tmp.name, "stderr.txt").read_text(encoding="utf-8", errors="replace").strip()
        last = err.splitlines()[-1] if err else ""
        if rc < 0:
            last = last or f"killed by signal {-rc}" + (" (CPU limit)" if -rc == signal.SIGXCPU else "")
        job.result = f"failed: {last or f'exit status {rc}'}"[:300]
    job.tmp.cleanup()


def execute_programs(programs: list[str], timeout: float = 10.0, memory_mb: int = 1024,
                     workers: int | None = None, progress: bool = True) -> list[str]:
    """Run each program in its own sandboxed process; return 'passed' | 'timed out' | 'failed: ...'.

    Processes are started and polled from this thread (no thread pool), because subprocess's
    preexec_fn is not safe to use together with threads.
    """
    workers = max(1, workers or min(8, os.cpu_count() or 1))
    jobs = [_Job(i, p) for i, p in enumerate(programs)]
    pending, running = deque(jobs), []
    bar = tqdm(total=len(jobs), desc="execute", unit="prog", disable=not progress, file=sys.stderr)
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.popleft()
                _start(job, timeout, memory_mb)
                running.append(job)
            still = []
            now = time.monotonic()
            for job in running:
                rc = job.proc.poll()
                if rc is not None or now > job.deadline:
                    _finish(job, rc)
                    bar.update(1)
                else:
                    still.append(job)
            running = still
            if running:
                time.sleep(0.005)
    finally:
        for job in running:  # interrupted: leave no stray processes or temp dirs behind
            _finish(job, None)
        bar.close()
    return [j.result for j in jobs]


def humaneval_program(problem: dict, completion: str) -> str:
    """prompt + completion + tests + check(entry_point), as openai/human-eval assembles it."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def score_humaneval_samples(problems: list[dict], samples: list[dict], *, timeout=10.0, memory_mb=1024,
                            workers=None, progress=True) -> tuple[dict, list[dict]]:
    """samples: [{task_id, completion}] (several per task for pass@k). Returns (metrics, per-sample log)."""
    by_id = {p["task_id"]: p for p in problems}
    programs = [humaneval_program(by_id[s["task_id"]], s["completion"]) for s in samples]
    results = execute_programs(programs, timeout=timeout, memory_mb=memory_mb, workers=workers, progress=progress)
    per_task: dict[str, list[bool]] = {}
    log = []
    for s, res in zip(samples, results):
        per_task.setdefault(s["task_id"], []).append(res == "passed")
        log.append({"task": "humaneval", "task_id": s["task_id"], "completion": s["completion"],
                    "result": res, "passed": res == "passed", **({"prompt": s["prompt"]} if "prompt" in s else {})})
    ns = np.array([len(v) for v in per_task.values()])
    cs = np.array([sum(v) for v in per_task.values()])
    metrics = {}
    for k in (1, 10, 100):
        if len(ns) and (ns >= k).all():
            metrics[f"pass@{k}"] = float(np.mean([pass_at_k(int(n), int(c), k) for n, c in zip(ns, cs)]))
    metrics["n"] = len(per_task)
    metrics["num_samples"] = int(ns.min()) if len(ns) else 0
    return metrics, log


def read_samples(path: Path, problems: list[dict]) -> list[dict]:
    """An openai/human-eval samples file: one {"task_id", "completion"} object per line."""
    if not path.is_file():
        raise EvalError(f"--samples {path}: no such file")
    ids = {p["task_id"] for p in problems}
    out = []
    for i, r in enumerate(_read_jsonl(path), 1):
        _require_keys(path, i, r, ("task_id", "completion"))
        if not isinstance(r["completion"], str):
            raise EvalError(f"{path}:{i}: 'completion' must be a string")
        if r["task_id"] not in ids:
            raise EvalError(f"{path}:{i}: unknown task_id {r['task_id']!r} (not among the "
                            f"{len(ids)} HumanEval problems being scored)")
        out.append({"task_id": r["task_id"], "completion": r["completion"]})
    if not out:
        raise EvalError(f"{path}: no samples; expected one {{\"task_id\", \"completion\"}} object per line")
    return out


# --------------------------------------------------------------------------------------------
# Scoring with a model (through benchmark.py's LM and loglikelihood)
# --------------------------------------------------------------------------------------------

@dataclass
class FitStats:
    """How prompts were fitted into the model's context window."""
    max_shots: int = 0
    reduced: int = 0        # prompts that got fewer shots than asked
    truncated: int = 0      # prompts still too long with 0 shots: truncated from the left
    total: int = 0
    min_shots: int | None = None

    def note(self, shots_used: int, truncated: bool) -> None:
        self.total += 1
        self.reduced += shots_used < self.max_shots
        self.truncated += truncated
        self.min_shots = shots_used if self.min_shots is None else min(self.min_shots, shots_used)

    def report(self, task: str, ctx_len: int) -> dict:
        parts = []
        if self.reduced:
            parts.append(f"{self.reduced} of {self.total} prompts got fewer than {self.max_shots} shots "
                         f"(min {self.min_shots}) to fit the model's {ctx_len}-token context")
        if self.truncated:
            parts.append(f"{self.truncated} of {self.total} prompts were longer than the context even with "
                         f"0 shots and were truncated from the left")
        if parts:
            warn(f"{task}: " + "; ".join(parts))
        return {"fewshot_reduced": self.reduced, "truncated": self.truncated}


class Scorer:
    """Prompt -> requests -> scores for one LM, with caching of continuation encodings."""

    def __init__(self, lm, batch_size: int = 8, progress: bool = True):
        self.lm = lm
        self.batch_size = batch_size
        self.progress = progress
        self.ctx_len = int(lm.max_seq_len)
        self._cont_cache: dict[str, int] = {}

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context move to the continuation; the continuation's
        tokens are the tail of encode(context + continuation) after encode(context)."""
        n = len(context) - len(context.rstrip())
        if n:
            continuation = context[-n:] + continuation
            context = context[:-n]
        whole = self.lm.encode(context + continuation)
        ctx = self.lm.encode(context)
        # an empty context stays empty: loglikelihood() conditions on the model's begin token then
        return ctx, whole[len(ctx):]

    def _cont_len(self, cont: str) -> int:
        if cont not in self._cont_cache:
            self._cont_cache[cont] = len(self.lm.encode(cont))
        return self._cont_cache[cont]

    def fit_context(self, build, k: int, reserve: int, stats: FitStats) -> str:
        """build(j) -> prompt with j shots; use the largest j <= k whose prompt plus `reserve`
        tokens fits the context window (harness would truncate from the left instead: keeping
        whole examples keeps the prompt well formed)."""
        for j in range(k, -1, -1):
            text = build(j)
            if len(self.lm.encode(text)) + reserve <= self.ctx_len:
                stats.note(j, False)
                return text
        stats.note(0, True)
        return build(0)

    def split_request(self, ctx: list[int], cont: list[int]) -> list[tuple[list[int], list[int]]]:
        """A continuation longer than the context window is scored in pieces of half a window, each
        conditioned on the tokens before it (the core keeps the newest context); the pieces' log
        probabilities add up to the whole continuation's."""
        if len(cont) <= self.ctx_len:
            return [(ctx, cont)]
        step = max(1, self.ctx_len // 2)
        full = ctx + cont
        return [(full[:i], full[i:i + step]) for i in range(len(ctx), len(full), step)]

    def multiple_choice(self, items: list[dict], task: str) -> list[dict]:
        """items: {context, continuations, gold, choice_lens?}. Adds lls, pred, acc, acc_norm."""
        reqs, owner, split = [], [], 0
        for i, it in enumerate(items):
            for j, c in enumerate(it["continuations"]):
                parts = self.split_request(*self.encode_pair(it["context"], c))
                split += len(parts) > 1
                reqs.extend(parts)
                owner.extend([(i, j)] * len(parts))
        if split:
            warn(f"{task}: {split} answer continuations were longer than the model's {self.ctx_len}-token "
                 f"context and were scored in windows of {max(1, self.ctx_len // 2)} tokens")
        if self.progress:
            print(f"{task}: {len(items)} questions, {len(reqs)} log-likelihood requests", file=sys.stderr)
        res = benchmark.loglikelihood(self.lm, reqs, batch_size=self.batch_size, progress=self.progress)
        lls = [[0.0] * len(it["continuations"]) for it in items]
        for (i, j), (ll, _greedy) in zip(owner, res):
            lls[i][j] += float(ll)
        for it, ll in zip(items, lls):
            lens = np.array(it.get("choice_lens") or [len(c) for c in it["continuations"]], dtype=np.float64)
            ll = np.array(ll)
            it["loglikelihoods"] = ll.tolist()
            it["pred"] = int(np.argmax(ll))
            it["acc"] = float(it["pred"] == it["gold"])
            it["acc_norm"] = float(int(np.argmax(ll / lens)) == it["gold"])
        return items

    def generate(self, prompt: str, max_new_tokens: int, stop: list[str], temperature=0.0,
                 seed=None) -> tuple[str, bool]:
        """Greedy/sampled continuation, cut at the first stop sequence. Prompts longer than the
        window minus max_new_tokens lose their oldest tokens (model.fit_prompt, the harness's rule;
        returned flag = truncated)."""
        full = self.lm.encode(prompt)
        ids, max_new = fishai.fit_prompt(full, max_new_tokens, self.ctx_len)
        text = self.lm.generate(ids, max_new, temperature=temperature, stop=stop, seed=seed)
        return fishai.cut_at_stop(text, stop), len(ids) < len(full)


def _limited(docs: list, limit: int | None) -> list:
    return docs if limit is None else docs[:limit]


def _aggregate(items: list[dict], metrics=("acc",)) -> dict:
    out = {}
    for m in metrics:
        out[m], out[f"{m}_stderr"] = mean_stderr([it[m] for it in items])
    out["n"] = len(items)
    return out


def _group(items: list[dict], key, metrics) -> dict:
    groups: dict[str, list] = {}
    for it in items:
        groups.setdefault(key(it), []).append(it)
    return {g: {**{m: float(np.mean([x[m] for x in v])) for m in metrics}, "n": len(v)}
            for g, v in sorted(groups.items())}


def _mc_log(task: str, items: list[dict]) -> list[dict]:
    return [{"task": task, "doc_id": it["doc_id"], **({"subject": it["subject"]} if "subject" in it else {}),
             "prompt": it["context"], "choices": it["continuations"], "target": it["gold"],
             "loglikelihoods": it["loglikelihoods"], "pred": it["pred"], "acc": it["acc"],
             "acc_norm": it["acc_norm"]} for it in items]


def run_mmlu_like(scorer: Scorer, task: str, data: dict, k: int, limit: int | None) -> tuple[dict, list]:
    """MMLU and C-Eval: k-shot from dev (first k), 4 letter continuations."""
    cue, describe = ("Answer:", mmlu_description) if task == "mmlu" else ("答案：", ceval_description)
    conts = [" " + L for L in LETTERS]
    reserve = max(scorer._cont_len(c) for c in conts) + 1
    stats = FitStats(max_shots=k)
    items = []
    for subject, (docs, dev) in data.items():
        if k > len(dev):
            raise EvalError(f"{task}: --num-fewshot {k} but subject {subject} has only {len(dev)} dev examples")
        shots = [mc_question(d, cue) + " " + LETTERS[d["answer"]] for d in dev[:k]]
        for i, doc in enumerate(_limited(docs, limit)):
            q = mc_question(doc, cue)
            ctx = scorer.fit_context(lambda j: fewshot_context(describe(subject), shots[:j], q), k, reserve, stats)
            items.append({"doc_id": i, "subject": subject, "context": ctx, "continuations": conts,
                          "gold": doc["answer"], "choice_lens": [1, 1, 1, 1]})
    fit = stats.report(task, scorer.ctx_len)
    scorer.multiple_choice(items, task)
    metrics = ("acc",) if task == "mmlu" else ("acc", "acc_norm")
    res = {**_aggregate(items, metrics), "num_fewshot": k, **fit}
    if task == "mmlu":
        res["categories"] = _group(items, lambda it: MMLU_SUBJECTS.get(it["subject"], "other"), metrics)
    else:
        res["categories"] = _group(items, lambda it: CEVAL_SUBJECTS[it["subject"]][1], metrics)
    res["subjects"] = _group(items, lambda it: it["subject"], metrics)
    return res, _mc_log(task, items)


def run_hellaswag(scorer: Scorer, rows: list[dict], train: list[dict], k: int, limit: int | None):
    docs = [hellaswag_doc(r) for r in _limited(rows, limit)]
    shots = [d["query"] + " " + d["choices"][d["gold"]] for d in (hellaswag_doc(r) for r in train[:k])]
    stats = FitStats(max_shots=k)
    items = []
    for i, d in enumerate(docs):
        conts = [" " + c for c in d["choices"]]
        reserve = max(len(scorer.lm.encode(c)) for c in conts) + 1
        ctx = scorer.fit_context(lambda j: fewshot_context("", shots[:j], d["query"]), k, reserve, stats)
        # acc_norm divides by the length of the ending in characters (the harness's choice strings)
        items.append({"doc_id": i, "context": ctx, "continuations": conts, "gold": d["gold"],
                      "choice_lens": [max(1, len(c)) for c in d["choices"]]})
    fit = stats.report("hellaswag", scorer.ctx_len)
    scorer.multiple_choice(items, "hellaswag")
    return {**_aggregate(items, ("acc", "acc_norm")), "num_fewshot": k, **fit}, _mc_log("hellaswag", items)


def gsm8k_shots(train: list[dict] | None, k: int) -> list[str]:
    pairs = [(r["question"], r["answer"]) for r in train[:k]] if train else GSM8K_FEWSHOT[:k]
    if len(pairs) < k:
        raise EvalError(f"gsm8k: --num-fewshot {k} but only {len(pairs)} few-shot examples are available")
    return [gsm8k_question(q) + " " + a for q, a in pairs]


def run_gsm8k(scorer: Scorer, rows: list[dict], shots: list[str], k: int, limit: int | None,
              max_new_tokens: int):
    stats = FitStats(max_shots=k)
    strict, flexible, log = [], [], []
    docs = _limited(rows, limit)
    for i, r in enumerate(tqdm(docs, desc="gsm8k", unit="q", disable=not scorer.progress, file=sys.stderr)):
        q = gsm8k_question(r["question"])
        prompt = scorer.fit_context(lambda j: fewshot_context("", shots[:j], q), k, max_new_tokens, stats)
        out, _ = scorer.generate(prompt, max_new_tokens, GSM8K_STOP)  # fit_context already counted truncation
        s, f = extract_strict(out), extract_flexible(out)
        strict.append(gsm8k_exact_match(s, r["answer"]))
        flexible.append(gsm8k_exact_match(f, r["answer"]))
        log.append({"task": "gsm8k", "doc_id": i, "prompt": prompt, "target": r["answer"], "response": out,
                    "strict": s, "flexible": f, "exact_match,strict-match": strict[-1],
                    "exact_match,flexible-extract": flexible[-1]})
    fit = stats.report("gsm8k", scorer.ctx_len)
    m1, s1 = mean_stderr(strict)
    m2, s2 = mean_stderr(flexible)
    return {"exact_match,strict-match": m1, "exact_match_stderr,strict-match": s1,
            "exact_match,flexible-extract": m2, "exact_match_stderr,flexible-extract": s2,
            "n": len(docs), "num_fewshot": k, **fit}, log


def generate_humaneval_samples(scorer: Scorer, problems: list[dict], num_samples: int, temperature: float,
                               max_new_tokens: int, seed: int) -> list[dict]:
    samples, truncated = [], 0
    total = len(problems) * num_samples
    with tqdm(total=total, desc="humaneval", unit="sample", disable=not scorer.progress, file=sys.stderr) as bar:
        for pi, p in enumerate(problems):
            for s in range(num_samples):
                out, t = scorer.generate(p["prompt"], max_new_tokens, HUMANEVAL_STOP, temperature=temperature,
                                         seed=None if temperature == 0 else seed + pi * num_samples + s)
                truncated += t
                samples.append({"task_id": p["task_id"], "completion": out, "prompt": p["prompt"]})
                bar.update(1)
    if truncated:
        warn(f"humaneval: {truncated} of {total} prompts were longer than the model's context "
             f"({scorer.ctx_len} tokens) minus {max_new_tokens} new tokens and were truncated from the left")
    return samples


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def parse_benchmarks(spec: str) -> list[str]:
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if not names:
        raise EvalError("--benchmark is empty; choose from " + ", ".join(BENCHMARKS) + ", all")
    out = []
    for n in names:
        if n == "all":
            out.extend(BENCHMARKS)
        elif n in BENCHMARKS:
            out.append(n)
        else:
            raise EvalError(f"unknown benchmark {n!r}; choose from {', '.join(BENCHMARKS)}, all "
                            f"(comma-separated for several)")
    return list(dict.fromkeys(out))


def check_args(args) -> list[str]:
    """The checks across flags and of the input paths, before anything is loaded (each numeric
    flag's own range is checked by the parser). Returns the benchmarks to run."""
    benches = parse_benchmarks(args.benchmark)
    if not (args.model or args.hf or args.samples):
        args.model = DEFAULT_MODEL
    if args.samples and benches != ["humaneval"]:
        raise EvalError("--samples scores HumanEval completions; use it with --benchmark humaneval")
    if "humaneval" in benches and not args.allow_code_execution:
        raise EvalError("HumanEval executes model-written code; re-run with --allow-code-execution "
                        "(each program runs in its own process with a timeout, memory/CPU limits, a temp dir "
                        "and an empty environment), or leave humaneval out of --benchmark")
    if args.num_samples > 1 and args.temperature == 0:
        raise EvalError("--num-samples > 1 with --temperature 0 gives identical greedy samples; "
                        "pass --temperature (e.g. 0.8) for pass@k")
    if args.num_fewshot and "humaneval" in benches:
        raise EvalError("humaneval is zero-shot; drop --num-fewshot or leave humaneval out")
    if args.model and not Path(args.model).exists():
        raise EvalError(f"--model {args.model}: no such file or directory")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise EvalError(f"--data-dir {args.data_dir}: no such directory")
    if args.json and args.log_samples and Path(args.json).resolve() == Path(args.log_samples).resolve():
        raise EvalError(f"--json and --log-samples both name {args.json}; give them different files")
    for flag, path in (("--json", args.json), ("--log-samples", args.log_samples)):
        du.check_new_file(path, flag, args.overwrite)  # refused now, not after an hour of scoring
    return benches


def load_gsm8k_data(data_dir, k: int) -> dict:
    """The GSM8K test rows and k shots: the training split's first k, as the harness takes them,
    or the built-in exemplars when that split is not available."""
    rows, train = load_gsm8k(data_dir, "test"), None
    if k > 0:
        try:
            train = load_gsm8k(data_dir, "train")
        except EvalError as e:
            warn(f"gsm8k: training split unavailable ({str(e).split(';')[0]}); using the built-in "
                 f"few-shot examples (evaluate.GSM8K_FEWSHOT)")
    return {"rows": rows, "shots": gsm8k_shots(train, k), "fewshot_source": "train split" if train else "built-in"}


def load_humaneval_data(data_dir, limit: int | None, samples_path: str | None) -> dict:
    """The HumanEval problems to score (the first --limit) and, with --samples, their completions."""
    all_problems = load_humaneval(data_dir)
    problems = _limited(all_problems, limit)
    if not samples_path:
        return {"problems": problems, "samples": None}
    keep = {p["task_id"] for p in problems}  # --limit: score the first N problems' samples
    samples = [x for x in read_samples(Path(samples_path), all_problems) if x["task_id"] in keep]
    if not samples:
        raise EvalError(f"--samples {samples_path}: no completions for the {len(problems)} "
                        f"problems selected by --limit")
    scored = {x["task_id"] for x in samples}
    if len(scored) < len(problems):
        warn(f"humaneval: {samples_path} has completions for {len(scored)} of {len(problems)} problems; "
             f"scoring those")
    return {"problems": [p for p in problems if p["task_id"] in scored], "samples": samples}


def load_benchmark_data(b: str, args) -> dict:
    """Everything benchmark `b` needs from disk or the hub, loaded before the model so that a bad
    file or a missing split fails fast. Always holds "k", the number of shots."""
    k = DEFAULT_FEWSHOT[b] if args.num_fewshot is None else args.num_fewshot
    d = args.data_dir
    if b in ("mmlu", "ceval"):
        return {"k": k, "data": (load_mmlu if b == "mmlu" else load_ceval)(d, need_dev=k > 0)}
    if b == "hellaswag":
        return {"k": k, "rows": load_hellaswag(d, "validation"), "train": load_hellaswag(d, "train") if k else []}
    if b == "gsm8k":
        return {"k": k, **load_gsm8k_data(d, k)}
    return {"k": k, **load_humaneval_data(d, args.limit, args.samples)}


def load_scorer(args) -> Scorer:
    """The model to score (--model or --hf) behind benchmark.py's LM, on the resolved device/dtype."""
    torch.manual_seed(args.seed)
    device = fishai.resolve_device(args.device)
    dtype = fishai.resolve_dtype(args.dtype, device)
    try:
        lm = benchmark.load_lm(args.hf or args.model, device=str(device), dtype=dtype, hf=bool(args.hf))
    except benchmark.BenchmarkError as e:  # a plain ValueError in benchmark.py: report it as bad input
        raise EvalError(du.one_line(e)) from None
    return Scorer(lm, batch_size=args.batch_size, progress=not args.quiet)


def max_new_tokens_for(b: str, args, ctx_len: int) -> int:
    """--max-new-tokens (or the benchmark's default), at most half the context window so that a
    prompt still fits beside it."""
    n = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[b]
    cap = ctx_len // 2
    if n > cap:
        warn(f"{b}: --max-new-tokens {n} does not fit the model's {ctx_len}-token context with a "
             f"prompt; using {cap}")
        n = cap
    return n


def run_benchmark(b: str, d: dict, scorer: Scorer | None, args) -> tuple[dict, list[dict]]:
    """Score one benchmark from its loaded data `d`; returns (metrics, sample log)."""
    k = d["k"]
    if b in ("mmlu", "ceval"):
        return run_mmlu_like(scorer, b, d["data"], k, args.limit)
    if b == "hellaswag":
        return run_hellaswag(scorer, d["rows"], d["train"], k, args.limit)
    if b == "gsm8k":
        res, log = run_gsm8k(scorer, d["rows"], d["shots"], k, args.limit, max_new_tokens_for(b, args, scorer.ctx_len))
        res["fewshot_source"] = d["fewshot_source"]
        return res, log
    samples = d["samples"]
    if samples is None:
        samples = generate_humaneval_samples(scorer, d["problems"], args.num_samples, args.temperature,
                                             max_new_tokens_for(b, args, scorer.ctx_len), args.seed)
    res, log = score_humaneval_samples(d["problems"], samples, timeout=args.exec_timeout,
                                       memory_mb=args.exec_memory_mb, workers=args.exec_workers,
                                       progress=not args.quiet)
    res["temperature"] = args.temperature
    return res, log


def evaluate(args, benches: list[str]) -> tuple[dict, list[dict]]:
    """Run the requested benchmarks; returns (results dict for --json, sample log)."""
    data = {b: load_benchmark_data(b, args) for b in benches}
    scorer = None if args.samples else load_scorer(args)
    results, log = {}, []
    for b in benches:
        t0 = time.time()
        res, lg = run_benchmark(b, data[b], scorer, args)
        res["seconds"] = round(time.time() - t0, 2)
        results[b] = res
        log.extend(lg)
    return results, log


def format_table(results: dict) -> str:
    rows = ["| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
    for task, r in results.items():
        for m, v in r.items():
            if m in ("n", "num_fewshot", "seconds", "temperature", "num_samples", "fewshot_reduced",
                     "truncated", "fewshot_source") or "stderr" in m or not isinstance(v, float):
                continue
            se = r.get(m.replace(",", "_stderr,", 1) if "," in m else f"{m}_stderr")
            se_s = f"{se:.4f}" if isinstance(se, float) else ""
            rows.append(f"| {task} | {m} | {v:.4f} | {se_s} | {r['n']} |")
        for group in ("categories",):
            for g, gr in r.get(group, {}).items():
                rows.append(f"| {task}/{g} | acc | {gr['acc']:.4f} |  | {gr['n']} |")
    return "\n".join(rows)


def write_outputs(args, benches: list[str], results: dict, log: list[dict]) -> None:
    """--json (metrics and the run's settings) and --log-samples (one JSON object per line), atomically."""
    if args.json:
        out = {"model": args.model or args.hf or f"samples:{args.samples}",
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "config": {"benchmarks": benches, "data": args.data_dir or "huggingface hub", "limit": args.limit,
                          "num_fewshot": args.num_fewshot, "batch_size": args.batch_size, "device": args.device,
                          "seed": args.seed, "num_samples": args.num_samples, "temperature": args.temperature},
               "results": results}
        du.atomic_write_text(args.json, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    if args.log_samples:
        du.atomic_write_text(args.log_samples, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in log))


def run(args) -> int:
    benches = check_args(args)
    results, log = evaluate(args, benches)
    print(format_table(results))
    write_outputs(args, benches, results, log)
    return du.EXIT_OK


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return du.run_cli(run, args)


if __name__ == "__main__":
    sys.exit(main())
