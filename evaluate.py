"""
Evaluate a FishAI (or any Hugging Face causal) language model on MMLU, C-Eval, HellaSwag, GSM8K and
HumanEval, scored exactly as lm-evaluation-harness 0.4.13 scores them (tests/test_evaluate.py runs the
real harness on the same data and model and compares every metric).

Usage:
  # 5-shot MMLU from the Hugging Face hub (cais/mmlu); without --num-fewshot it is 0-shot, as in the harness
  python evaluate.py --model checkpoints/fishai-best.pt --benchmark mmlu --num-fewshot 5
  # two MMLU subjects and one C-Eval subject, from local copies
  python evaluate.py --model checkpoints/fishai-best.pt --benchmark mmlu,ceval --data-dir ../shared/data \\
      --subjects anatomy,marketing,computer_network
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

Scoring (lm-evaluation-harness 0.4.13's task files mmlu/default, ceval, hellaswag, gsm8k, humaneval):
  mmlu       0-shot by default; k shots are the first k of the dev split; "question / A. .. D. /
             Answer:", argmax of log p(" A".." D"); acc per subject, size-weighted per category and overall.
  ceval      the same in Chinese (dev shots, val split scored); acc and acc_norm per subject and
             size-weighted overall (and per C-Eval category: STEM, Social Science, Humanities, Other).
  hellaswag  0-shot by default (k shots: the harness's seeded sampler, from the train split), the
             harness's text preprocessing, 4 endings: acc (summed log-likelihood) and acc_norm
             (log-likelihood / length of the ending in characters).
  gsm8k      5-shot "Question: ..\\nAnswer: ..", shots drawn from the train split by the harness's
             seeded sampler (--fewshot-seed), greedy, at most 256 new tokens, stop at "Question:",
             "</s>", "<|im_end|>" and the model's EOS; exact_match with the strict ("#### N") and
             flexible (last number) extraction.
  humaneval  completion of the prompt (at most 1024 new tokens), Codex stop sequences, execution of
             the problem's tests in a sandboxed subprocess (only with --allow-code-execution); pass@1
             (greedy) or pass@k with the unbiased estimator of Chen et al. (2021).
  A prompt longer than the model's context keeps its newest tokens (the harness's rule); with
  --drop-shots whole few-shot examples are dropped instead. --json counts both.

Log-likelihood scoring and generation go through scoring.py (load_lm, LM, loglikelihood), the
same code reference_benchmark.py uses, so FishAI checkpoints and HF baselines are scored alike.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
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

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from engine import cut_at_stop, fit_prompt
import readers
import scoring

BENCHMARKS = ("mmlu", "ceval", "hellaswag", "gsm8k", "humaneval")
# lm-eval 0.4.13's defaults: num_fewshot of gsm8k.yaml (5) and humaneval.yaml (0); the mmlu, ceval and
# hellaswag task files set none, and simple_evaluate then runs 0-shot (the usual "5-shot MMLU" is
# --num-fewshot 5 in both tools)
DEFAULT_FEWSHOT = {"mmlu": 0, "ceval": 0, "hellaswag": 0, "gsm8k": 5, "humaneval": 0}
# max_gen_toks: humaneval.yaml's 1024, else the HF model class's default of 256
DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 256, "humaneval": 1024}
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
DEFAULT_MODEL = "checkpoints/fishai-best.pt"  # what train.py writes

DATA_DIR_LAYOUT = """\
DIR/mmlu/dev/<subject>_dev.csv, DIR/mmlu/test/<subject>_test.csv   (no header: question,A,B,C,D,answer)
DIR/ceval/dev/<subject>_dev.csv, DIR/ceval/val/<subject>_val.csv   (header: id,question,A,B,C,D,answer[,explanation])
DIR/hellaswag/hellaswag_val*.jsonl [+ hellaswag_train.jsonl for shots]  (rowanz/hellaswag jsonl)
DIR/gsm8k/test.jsonl [+ train.jsonl for shots]                     (question, answer)
DIR/humaneval/HumanEval.jsonl[.gz]                                 (task_id, prompt, canonical_solution, test, entry_point)"""
SEE_LAYOUT = "see the --data-dir layout in `python evaluate.py --help`"


class EvalError(common.FishAIError):
    """A bad input (file, column, flag): the message names it and says what to do."""


def _add_prompt_flags(p: common.ArgumentParser) -> None:
    p.add_argument("--limit", type=common.int_flag(1), help="score only the first N documents (per subject for mmlu/ceval)")
    p.add_argument("--subjects", metavar="LIST",
                   help="mmlu/ceval: only these subjects (comma-separated, e.g. anatomy,computer_network)")
    p.add_argument("--num-fewshot", type=common.int_flag(0),
                   help="shots (default: " + ", ".join(f"{b} {k}" for b, k in DEFAULT_FEWSHOT.items()) + ")")
    p.add_argument("--fewshot-seed", type=common.int_flag(0), default=FEWSHOT_SEED,
                   help="seed of the harness's few-shot sampler (gsm8k, hellaswag); mmlu/ceval take the first k")
    p.add_argument("--drop-shots", action="store_true",
                   help="drop whole few-shot examples (the last first) until a prompt fits the context, instead "
                        "of cutting its oldest tokens as lm-evaluation-harness does (--json reports the shots used)")


def build_parser() -> common.ArgumentParser:
    p = common.ArgumentParser(
        description="Evaluate a model on MMLU, C-Eval, HellaSwag, GSM8K and HumanEval\n"
                    "(scored exactly as lm-evaluation-harness 0.4.13 scores them).",
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
    _add_prompt_flags(p)
    p.add_argument("--batch-size", type=common.int_flag(1), default=8, help="log-likelihood batch size")
    common.add_device_flag(p)
    common.add_dtype_flag(p, "model dtype (default auto: bf16 on CUDA, fp16 where bf16 is unsupported, fp32 elsewhere)")
    common.add_dequantize_flag(p)
    p.add_argument("--seed", type=common.int_flag(0), default=1234, help="seed for sampling")
    p.add_argument("--max-new-tokens", type=common.int_flag(1),
                   help="tokens to generate per answer (default: " +
                        ", ".join(f"{b} {n}" for b, n in DEFAULT_MAX_NEW_TOKENS.items()) + ")")
    p.add_argument("--max-gen-toks", dest="max_new_tokens", type=common.int_flag(1), help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="PATH", help="write per-task metrics (harness metric names, n) here")
    p.add_argument("--log-samples", metavar="PATH",
                   help="write every prompt, target and model answer as JSON lines here")
    common.add_overwrite_flag(p, "existing --json / --log-samples files")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="HumanEval: allow executing model-written code (sandboxed subprocess, timeout, rlimits)")
    p.add_argument("--num-samples", type=common.int_flag(1), default=1,
                   help="HumanEval samples per problem; 1 decodes greedily")
    p.add_argument("--temperature", type=common.float_flag(0), default=0.0,
                   help="HumanEval sampling temperature (default 0: greedy)")
    p.add_argument("--exec-timeout", type=common.float_flag(0, lo_open=True), default=3.0,
                   help="seconds per HumanEval program (3: the harness's code_eval and openai/human-eval)")
    p.add_argument("--exec-memory-mb", type=common.int_flag(64), default=1024, help="address-space limit per program in MB")
    p.add_argument("--exec-workers", type=common.int_flag(1), help="programs run in parallel (default: CPU count, max 8)")
    common.add_quiet_flag(p)
    return p


HF_DATASETS = {
    "mmlu": ("cais/mmlu", "all"),
    "ceval": ("ceval/ceval-exam", "<subject>"),
    "hellaswag": ("Rowan/hellaswag", None),
    "gsm8k": ("openai/gsm8k", "main"),
    "humaneval": ("openai/openai_humaneval", None),
}
LETTERS = ("A", "B", "C", "D")

# MMLU subjects by category, as lm-evaluation-harness 0.4.13 groups them (mmlu_stem, mmlu_humanities, ...).
_MMLU_BY_CATEGORY = {
    "stem": """
        abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science
        college_mathematics college_physics computer_security conceptual_physics electrical_engineering
        elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science
        high_school_mathematics high_school_physics high_school_statistics machine_learning
        """,
    "humanities": """
        formal_logic high_school_european_history high_school_us_history high_school_world_history
        international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy
        prehistory professional_law world_religions
        """,
    "social_sciences": """
        econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics
        high_school_microeconomics high_school_psychology human_sexuality professional_psychology
        public_relations security_studies sociology us_foreign_policy
        """,
    "other": """
        business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing
        medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology
        """,
}
MMLU_SUBJECTS = {s: cat for cat, names in _MMLU_BY_CATEGORY.items() for s in names.split()}

# C-Eval subjects (English name, Chinese name) by category, from C-Eval's subject_mapping.json, in the
# order of lm-evaluation-harness's ceval-valid group.
_CEVAL_BY_CATEGORY = {
    "STEM": """
        computer_network 计算机网络, operating_system 操作系统,
        computer_architecture 计算机组成, college_programming 大学编程,
        college_physics 大学物理, college_chemistry 大学化学, advanced_mathematics 高等数学,
        probability_and_statistics 概率统计, discrete_mathematics 离散数学,
        electrical_engineer 注册电气工程师, metrology_engineer 注册计量师,
        high_school_mathematics 高中数学, high_school_physics 高中物理,
        high_school_chemistry 高中化学, high_school_biology 高中生物,
        middle_school_mathematics 初中数学, middle_school_biology 初中生物,
        middle_school_physics 初中物理, middle_school_chemistry 初中化学,
        veterinary_medicine 兽医学
        """,
    "Social Science": """
        college_economics 大学经济学, business_administration 工商管理,
        marxism 马克思主义基本原理,
        mao_zedong_thought 毛泽东思想和中国特色社会主义理论体系概论,
        education_science 教育学, teacher_qualification 教师资格, high_school_politics 高中政治,
        high_school_geography 高中地理, middle_school_politics 初中政治,
        middle_school_geography 初中地理
        """,
    "Humanities": """
        modern_chinese_history 近代史纲要,
        ideological_and_moral_cultivation 思想道德修养与法律基础, logic 逻辑学, law 法学,
        chinese_language_and_literature 中国语言文学, art_studies 艺术学,
        professional_tour_guide 导游资格, legal_professional 法律职业资格,
        high_school_chinese 高中语文, high_school_history 高中历史,
        middle_school_history 初中历史
        """,
    "Other": """
        civil_servant 公务员, sports_science 体育学, plant_protection 植物保护,
        basic_medicine 基础医学, clinical_medicine 临床医学,
        urban_and_rural_planner 注册城乡规划师, accountant 注册会计师,
        fire_engineer 注册消防工程师,
        environmental_impact_assessment_engineer 环境影响评价工程师, tax_accountant 税务师,
        physician 医师资格
        """,
}
CEVAL_SUBJECTS = {s: (name, cat) for cat, text in _CEVAL_BY_CATEGORY.items()
                  for s, name in (pair.split() for pair in text.split(","))}

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

# generation_kwargs.until of gsm8k.yaml and humaneval.yaml (the Codex paper's stop sequences); the
# harness's HF model class adds the model's EOS token string to both (Scorer.generate does too)
GSM8K_STOP = ["Question:", "</s>", "<|im_end|>"]
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
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
    """readers.load_hf_dataset (offline-aware), with the --data-dir hint."""
    try:
        return readers.load_hf_dataset(name, config, split=split)
    except common.DataError as e:
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
    """The rows of a benchmark .jsonl(.gz) file, read by readers.iter_jsonl; each must be an object."""
    rows = []
    for i, row in readers.iter_jsonl(path, fix="expected one JSON object per line"):  # read whole: nothing skipped
        if not isinstance(row, dict):
            raise EvalError(f"{path}:{i}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
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


def _load_mc_local(data_dir, bench: str, split: str, subjects: list[str] | None,
                   need_dev: bool) -> dict[str, tuple[list[dict], list[dict]]]:
    """subject -> (docs of `split`, dev docs) from DIR/<bench>/<split>/<subject>_<split>.csv and
    DIR/<bench>/dev/<subject>_dev.csv; `subjects` (from --subjects) or every subject found."""
    read = read_mmlu_csv if bench == "mmlu" else read_ceval_csv
    eval_dir = _split_dir(Path(data_dir), bench, split, f"{bench} scoring")
    found = _subjects_in(eval_dir, f"_{split}.csv")
    if not found:
        raise EvalError(f"{eval_dir}: no <subject>_{split}.csv files; {SEE_LAYOUT}")
    if bench == "ceval":
        unknown = [s for s in found if s not in CEVAL_SUBJECTS]
        if unknown:
            raise EvalError(f"{eval_dir / (unknown[0] + '_val.csv')}: unknown C-Eval subject {unknown[0]!r}; "
                            f"expected one of the 52 ceval-exam subjects")
    if subjects is not None:
        missing = [s for s in subjects if s not in found]
        if missing:
            raise EvalError(f"--subjects {missing[0]}: no {eval_dir / (missing[0] + f'_{split}.csv')}; "
                            f"this --data-dir has {', '.join(found)}")
        found = subjects
    dev_dir = _split_dir(Path(data_dir), bench, "dev", "the few-shot examples; or pass --num-fewshot 0") \
        if need_dev else None
    out = {}
    for s in sorted(found):
        dev = []
        if dev_dir is not None:
            p = dev_dir / f"{s}_dev.csv"
            if not p.is_file():
                raise EvalError(f"missing split: {p} (few-shot examples for {s}); or pass --num-fewshot 0")
            dev = read(p, s)
        out[s] = (read(eval_dir / f"{s}_{split}.csv", s), dev)
    return out


def load_mmlu(data_dir=None, need_dev: bool = True,
              subjects: list[str] | None = None) -> dict[str, tuple[list[dict], list[dict]]]:
    """subject -> (test docs, dev docs). Docs: {subject, question, choices[4], answer (0-3)}."""
    if data_dir is not None:
        return _load_mc_local(data_dir, "mmlu", "test", subjects, need_dev)
    name, config = HF_DATASETS["mmlu"]
    out: dict[str, tuple[list, list]] = {}
    for sp in ("test", "dev") if need_dev else ("test",):
        for i, r in enumerate(_hf_load(name, config, sp)):
            _require_keys(f"{name}[{sp}]", i, r, ("question", "subject", "choices", "answer"))
            if subjects is None or r["subject"] in subjects:
                doc = {"subject": r["subject"], "question": r["question"], "choices": list(r["choices"]),
                       "answer": int(r["answer"])}
                out.setdefault(r["subject"], ([], []))[0 if sp == "test" else 1].append(doc)
    return dict(sorted(out.items()))


def load_ceval(data_dir=None, need_dev: bool = True,
               subjects: list[str] | None = None) -> dict[str, tuple[list[dict], list[dict]]]:
    """subject -> (val docs, dev docs); the test split's labels are hidden, so val is scored."""
    if data_dir is not None:
        return _load_mc_local(data_dir, "ceval", "val", subjects, need_dev)
    name = HF_DATASETS["ceval"][0]
    out = {}
    for s in subjects or CEVAL_SUBJECTS:
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
    return f"以下是中国关于{CEVAL_SUBJECTS.get(subject, (subject,))[0]}的单项选择题，请选出其中的正确答案。\n\n"


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
    """exact_match's regexes_to_ignore for gsm8k (',', '$', everything up to '#### ', a final '.'), then
    ignore_case; nothing else (the harness does not strip whitespace)."""
    for r in GSM8K_IGNORE_RES:
        s = r.sub("", s)
    return s.lower()


def gsm8k_exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n-c, k) / C(n, k), in a numerically stable form."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_stderr(xs) -> tuple[float, float | None]:
    """The mean and its standard error (sample std / sqrt(n)); None (the harness's "N/A") for n < 2."""
    a = np.asarray(xs, dtype=np.float64)
    if len(a) == 0:
        return float("nan"), None
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else None  # None: valid JSON
    return float(a.mean()), se


def pooled_stderr(stderrs: list, sizes: list[int]) -> float | None:
    """lm-eval's stderr of a size-weighted group mean (metrics.pooled_sample_stderr over the group's
    subtasks); None when a subtask has none or there is only one subtask of one document."""
    if any(se is None for se in stderrs) or sum(sizes) <= len(sizes):
        return None
    var = sum((n - 1) * se ** 2 * n for n, se in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
    return float(math.sqrt(var / sum(sizes)))


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
# Scoring with a model (through scoring.py's LM and loglikelihood)
# --------------------------------------------------------------------------------------------

# the most (B, T, V) float32 logits one forward may hold, as in scoring.loglikelihood
LOGITS_BUDGET = 2 * 2**30


class Scorer:
    """Prompt -> requests -> scores for one LM, tokenized, truncated and decoded as lm-evaluation-harness's
    HF model class (lm_eval.models.huggingface.HFLM) does it."""

    def __init__(self, lm, batch_size: int = 8, progress: bool = True):
        self.lm = lm
        self.batch_size = batch_size
        self.progress = progress
        self.ctx_len = int(lm.max_seq_len)
        # the harness adds the EOS token's text to the stop strings of every generation
        self.eos_text = lm.decode([lm.eos_id]) if lm.eos_id is not None else None

    def encode(self, text: str) -> list[int]:
        """HFLM.tok_encode: an HF tokenizer adds its own special tokens (a Llama tokenizer's BOS); FishAI's
        tokenizer (and its HF export) adds none."""
        if self.lm.kind == "hf":
            return list(self.lm.tokenizer.encode(text))
        return self.lm.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The harness's split: trailing spaces of the context move to the continuation; the continuation's
        tokens are the tail of encode(context + continuation) after encode(context). An empty context
        becomes the begin token (BOS, else EOS)."""
        if not context:
            cont = self.lm.encode(continuation)
            begin = self.lm.begin_id
            return ([begin], cont) if cont[0] != begin else (cont[:1], cont[1:])
        n = len(context) - len(context.rstrip())
        if n:
            continuation = context[-n:] + continuation
            context = context[:-n]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    def prompt(self, description: str, shots: list[str], query: str, reserve: int,
               drop_shots: bool) -> tuple[str, int]:
        """(prompt text, shots in it): all the shots (the harness: a prompt too long keeps its newest
        tokens), or with drop_shots the most j <= len(shots) whose prompt plus `reserve` tokens fits."""
        j = len(shots)
        while drop_shots and j > 0 and len(self.encode(fewshot_context(description, shots[:j], query))) \
                + reserve > self.ctx_len:
            j -= 1
        return fewshot_context(description, shots[:j], query), j

    def split_request(self, ctx: list[int], cont: list[int]) -> list[tuple[list[int], list[int]]]:
        """A continuation longer than the context window is scored in pieces of half a window, each
        conditioned on the tokens before it (the core keeps the newest context); the pieces' log
        probabilities add up to the whole continuation's."""
        if len(cont) <= self.ctx_len:
            return [(ctx, cont)]
        step = max(1, self.ctx_len // 2)
        full = ctx + cont
        return [(full[:i], full[i:i + step]) for i in range(len(ctx), len(full), step)]

    def next_token_logprobs(self, contexts: list[list[int]]) -> list[torch.Tensor]:
        """log p(next token | context) over the vocabulary, for each context's newest max_seq_len tokens:
        longest first, right-padded batches (causal attention makes the padding invisible)."""
        if not contexts:
            return []
        inputs = [ctx[-self.ctx_len:] for ctx in contexts]
        order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), i))
        out: list = [None] * len(inputs)
        bar = tqdm(total=len(order), desc="scoring", unit="q", disable=not self.progress, file=sys.stderr)
        start = 0
        while start < len(order):
            T = len(inputs[order[start]])
            chunk = order[start:start + max(1, min(self.batch_size, LOGITS_BUDGET // (T * self.lm.vocab_size * 4)))]
            start += len(chunk)
            idx = torch.zeros(len(chunk), T, dtype=torch.long)
            for b, i in enumerate(chunk):
                idx[b, :len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
            logits = self.lm.logits(idx)
            for b, i in enumerate(chunk):
                out[i] = F.log_softmax(logits[b, len(inputs[i]) - 1], dim=-1).cpu()
            bar.update(len(chunk))
        bar.close()
        return out

    def _per_choice_loglikelihoods(self, pairs: list[list[tuple]], task: str) -> list[list[float]]:
        """One request per (question, choice): scoring.loglikelihood, long continuations in windows."""
        reqs, owner, split = [], [], 0
        for i, ps in enumerate(pairs):
            for j, (ctx, cont) in enumerate(ps):
                parts = self.split_request(ctx, cont)
                split += len(parts) > 1
                reqs.extend(parts)
                owner.extend([(i, j)] * len(parts))
        if split:
            warn(f"{task}: {split} answer continuations were longer than the model's {self.ctx_len}-token "
                 f"context and were scored in windows of {max(1, self.ctx_len // 2)} tokens")
        lls = [[0.0] * len(ps) for ps in pairs]
        for (i, j), (ll, _greedy) in zip(owner, scoring.loglikelihood(self.lm, reqs, batch_size=self.batch_size,
                                                                        progress=self.progress)):
            lls[i][j] += float(ll)
        return lls

    def multiple_choice(self, items: list[dict], task: str) -> list[dict]:
        """items: {context, continuations, gold, choice_lens?}. Adds loglikelihoods, pred, acc, acc_norm and
        truncated (context + continuation longer than the window + 1: the oldest tokens are cut).

        A question whose choices are all one token after its context (MMLU/C-Eval " A".." D") costs one
        forward pass: the harness's per-choice inputs (context + choice)[-(L+1):][:-1] are then the same
        tokens, the context's newest L, so the choices' scores are entries of one next-token distribution."""
        pairs = [[self.encode_pair(it["context"], c) for c in it["continuations"]] for it in items]
        one_token = [i for i, ps in enumerate(pairs) if all(len(cont) == 1 and ctx == ps[0][0] for ctx, cont in ps)]
        other = sorted(set(range(len(items))) - set(one_token))
        if self.progress:
            print(f"{task}: {len(items)} questions, {len(one_token)} of them scored in one forward pass",
                  file=sys.stderr)
        lls: list = [None] * len(items)
        for i, logp in zip(one_token, self.next_token_logprobs([pairs[i][0][0] for i in one_token])):
            lls[i] = [float(logp[cont[0]]) for _, cont in pairs[i]]
        for i, ll in zip(other, self._per_choice_loglikelihoods([pairs[i] for i in other], task)):
            lls[i] = ll
        for it, ps, ll in zip(items, pairs, lls):
            lens = np.array(it.get("choice_lens") or [len(c) for c in it["continuations"]], dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice: the harness divides by 0 too
                norm = np.array(ll) / lens
            it.update(loglikelihoods=ll, pred=int(np.argmax(ll)), truncated=any(
                len(ctx) + len(cont) > self.ctx_len + 1 for ctx, cont in ps))
            it["acc"] = float(it["pred"] == it["gold"])
            it["acc_norm"] = float(int(np.argmax(norm)) == it["gold"])
        return items

    def _decode_generated(self, ids: list[int]) -> str:
        """HFLM.tok_decode: generated text without special tokens."""
        if self.lm.kind == "hf":
            return self.lm.tokenizer.decode(ids, skip_special_tokens=True)
        return self.lm.tokenizer.decode(ids, skip_special=True)

    def generate(self, prompt: str, max_new_tokens: int, stop: list[str], temperature=0.0,
                 seed=None) -> tuple[str, bool]:
        """The harness's generate_until for one prompt: it keeps its newest max_seq_len - max_new_tokens
        tokens (model.fit_prompt); the continuation ends at EOS, at a stop string or the EOS text, or after
        max_new_tokens, and is cut before the first stop string. Returns (text, prompt was truncated)."""
        full = self.encode(prompt)
        ids, max_new = fit_prompt(full, max_new_tokens, self.ctx_len)
        stops = list(stop) + ([self.eos_text] if self.eos_text and self.eos_text not in stop else [])
        new, _ = self.lm.generate_ids(ids, max_new, temperature=temperature, stop=stops, seed=seed)
        return cut_at_stop(self._decode_generated(new), stops), len(ids) < len(full)


def sample_shots(rnd: random.Random, pool: list, n: int, eval_doc=None) -> list:
    """lm-eval 0.4.13's default few-shot sampler (api/samplers.ContextSampler.sample): n draws from `pool`
    with the task's one random.Random(fewshot seed), drawn in document order. With eval_doc (the harness
    passes it when the few-shot split is the scored split, or neither is named: hellaswag) n + 1 are drawn
    and copies of eval_doc removed."""
    if n == 0:
        return []
    if eval_doc is None:
        return rnd.sample(pool, n)
    res = [x for x in rnd.sample(pool, n + 1) if x != eval_doc][:n]
    if len(res) < n:
        res = rnd.sample([x for x in pool if x != eval_doc], n)
    return res


def fit_report(task: str, rows: list[dict], k: int, ctx_len: int) -> dict:
    """How the prompts met the context, for --json: num_fewshot (the fewest shots a prompt got: k
    unless --drop-shots dropped some), fewshot_reduced (prompts that got fewer) and truncated (prompts
    that lost their oldest tokens: the harness's rule). Warns when either happened."""
    shots = [r["num_fewshot"] for r in rows]
    reduced = sum(s < k for s in shots)
    truncated = sum(bool(r["truncated"]) for r in rows)
    parts = []
    if reduced:
        parts.append(f"{reduced} of {len(rows)} prompts got fewer than {k} shots (min {min(shots)}) to fit "
                     f"the model's {ctx_len}-token context (--drop-shots)")
    if truncated:
        parts.append(f"{truncated} of {len(rows)} prompts did not fit the model's {ctx_len}-token context "
                     f"and lost their oldest tokens (lm-evaluation-harness's rule)")
    if parts:
        warn(f"{task}: " + "; ".join(parts))
    return {"num_fewshot": min(shots, default=k), "fewshot_reduced": reduced, "truncated": truncated}


def _limited(docs: list, limit: int | None) -> list:
    return docs if limit is None else docs[:limit]


def _aggregate(items: list[dict], metrics=("acc",)) -> dict:
    out = {}
    for m in metrics:
        out[m], out[f"{m}_stderr"] = mean_stderr([it[m] for it in items])
    out["n"] = len(items)
    return out


def _combine(groups: list[dict], metrics) -> dict:
    """A harness group of subtasks (aggregate_metric_list with weight_by_size): the size-weighted mean and
    the pooled standard error of each metric."""
    sizes = [g["n"] for g in groups]
    out = {}
    for m in metrics:
        out[m] = sum(g[m] * g["n"] for g in groups) / sum(sizes)
        out[f"{m}_stderr"] = pooled_stderr([g[f"{m}_stderr"] for g in groups], sizes)
    out["n"] = sum(sizes)
    return out


def _mc_log(task: str, items: list[dict]) -> list[dict]:
    return [{"task": task, "doc_id": it["doc_id"], **({"subject": it["subject"]} if "subject" in it else {}),
             "prompt": it["context"], "num_fewshot": it["num_fewshot"], "truncated": it["truncated"],
             "choices": it["continuations"], "target": it["gold"], "loglikelihoods": it["loglikelihoods"],
             "pred": it["pred"], "acc": it["acc"], "acc_norm": it["acc_norm"]} for it in items]


def run_mmlu_like(scorer: Scorer, task: str, data: dict, k: int, limit: int | None,
                  drop_shots: bool = False) -> tuple[dict, list]:
    """MMLU and C-Eval: the first k dev examples as shots (the harness's first_n sampler), 4 letter
    continuations; per subject, per category and overall as the harness's groups aggregate them."""
    cue, describe = ("Answer:", mmlu_description) if task == "mmlu" else ("答案：", ceval_description)
    conts = [" " + L for L in LETTERS]
    reserve = max(len(scorer.encode(c)) for c in conts) - 1  # context + continuation may fill L + 1
    items = []
    for subject, (docs, dev) in data.items():
        if k > len(dev):
            raise EvalError(f"{task}: --num-fewshot {k} but subject {subject} has only {len(dev)} dev examples")
        shots = [mc_question(d, cue) + " " + LETTERS[d["answer"]] for d in dev[:k]]
        for i, doc in enumerate(_limited(docs, limit)):
            ctx, used = scorer.prompt(describe(subject), shots, mc_question(doc, cue), reserve, drop_shots)
            items.append({"doc_id": i, "subject": subject, "context": ctx, "num_fewshot": used,
                          "continuations": conts, "gold": doc["answer"], "choice_lens": [1, 1, 1, 1]})
    scorer.multiple_choice(items, task)
    metrics = ("acc",) if task == "mmlu" else ("acc", "acc_norm")
    subjects = {s: _aggregate([it for it in items if it["subject"] == s], metrics) for s in data}
    category = (lambda s: MMLU_SUBJECTS.get(s, "other")) if task == "mmlu" else (lambda s: CEVAL_SUBJECTS[s][1])
    cats = sorted({category(s) for s in subjects})
    res = {**_combine(list(subjects.values()), metrics), **fit_report(task, items, k, scorer.ctx_len)}
    res["categories"] = {c: _combine([r for s, r in subjects.items() if category(s) == c], metrics) for c in cats}
    res["subjects"] = subjects
    return res, _mc_log(task, items)


def run_hellaswag(scorer: Scorer, rows: list[dict], train: list[dict], k: int, limit: int | None,
                  drop_shots: bool = False, seed: int = FEWSHOT_SEED):
    """0-shot by default; k shots are drawn from the train split by the harness's sampler, which
    removes the scored document from its n + 1 draws (hellaswag.yaml names no test or few-shot split)."""
    if k > len(train):
        raise EvalError(f"hellaswag: --num-fewshot {k} but the train split has only {len(train)} rows")
    rnd = random.Random(seed)
    items = []
    for i, row in enumerate(_limited(rows, limit)):
        d = hellaswag_doc(row)
        shots = [s["query"] + " " + s["choices"][s["gold"]]
                 for s in map(hellaswag_doc, sample_shots(rnd, train, k, eval_doc=row))]
        conts = [" " + c for c in d["choices"]]
        reserve = max(len(scorer.encode(c)) for c in conts) - 1
        ctx, used = scorer.prompt("", shots, d["query"], reserve, drop_shots)
        # acc_norm divides by the length of the ending in characters (the harness's choice strings)
        items.append({"doc_id": i, "context": ctx, "num_fewshot": used, "continuations": conts, "gold": d["gold"],
                      "choice_lens": [len(c) for c in d["choices"]]})
    scorer.multiple_choice(items, "hellaswag")
    res = {**_aggregate(items, ("acc", "acc_norm")), **fit_report("hellaswag", items, k, scorer.ctx_len)}
    return res, _mc_log("hellaswag", items)


def gsm8k_shots(pool: list[tuple[str, str]] | None, k: int, rnd: random.Random | None = None) -> list[str]:
    """k shots "Question: ..\\nAnswer: <worked solution>": the harness's sampler's draw (rnd) from the
    train split's (question, answer) pairs, or without them the first k built-in exemplars."""
    if pool is None:
        pool, rnd = GSM8K_FEWSHOT, None
    if k > len(pool):
        raise EvalError(f"gsm8k: --num-fewshot {k} but only {len(pool)} few-shot examples are available")
    chosen = sample_shots(rnd, pool, k) if rnd is not None else pool[:k]
    return [gsm8k_question(q) + " " + a for q, a in chosen]


def run_gsm8k(scorer: Scorer, rows: list[dict], pool: list[tuple[str, str]] | None, k: int, limit: int | None,
              max_new_tokens: int, drop_shots: bool = False, seed: int = FEWSHOT_SEED):
    rnd = random.Random(seed)
    log = []
    for i, r in enumerate(tqdm(_limited(rows, limit), desc="gsm8k", unit="q", disable=not scorer.progress,
                               file=sys.stderr)):
        prompt, used = scorer.prompt("", gsm8k_shots(pool, k, rnd), gsm8k_question(r["question"]),
                                     max_new_tokens, drop_shots)
        out, truncated = scorer.generate(prompt, max_new_tokens, GSM8K_STOP)
        s, f = extract_strict(out), extract_flexible(out)
        log.append({"task": "gsm8k", "doc_id": i, "prompt": prompt, "num_fewshot": used, "truncated": truncated,
                    "target": r["answer"], "response": out, "strict": s, "flexible": f,
                    "exact_match,strict-match": gsm8k_exact_match(s, r["answer"]),
                    "exact_match,flexible-extract": gsm8k_exact_match(f, r["answer"])})
    res = {}
    for m in ("strict-match", "flexible-extract"):
        res[f"exact_match,{m}"], res[f"exact_match_stderr,{m}"] = mean_stderr([x[f"exact_match,{m}"] for x in log])
    return {**res, "n": len(log), **fit_report("gsm8k", log, k, scorer.ctx_len),
            "max_new_tokens": max_new_tokens}, log


def generate_humaneval_samples(scorer: Scorer, problems: list[dict], num_samples: int, temperature: float,
                               max_new_tokens: int, seed: int) -> list[dict]:
    samples = []
    total = len(problems) * num_samples
    with tqdm(total=total, desc="humaneval", unit="sample", disable=not scorer.progress, file=sys.stderr) as bar:
        for pi, p in enumerate(problems):
            for s in range(num_samples):
                out, truncated = scorer.generate(p["prompt"], max_new_tokens, HUMANEVAL_STOP, temperature=temperature,
                                                 seed=None if temperature == 0 else seed + pi * num_samples + s)
                samples.append({"task_id": p["task_id"], "completion": out, "prompt": p["prompt"],
                                "num_fewshot": 0, "truncated": truncated})
                bar.update(1)
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


def parse_subjects(spec: str | None, benches: list[str]) -> dict[str, list[str] | None]:
    """--subjects -> {"mmlu": [...], "ceval": [...]} for the multiple-choice benchmarks being run (None:
    every subject). A name may belong to either (college_physics is in both); each one named must belong
    to a benchmark being run, and each of those must get at least one."""
    mc = [b for b in benches if b in ("mmlu", "ceval")]
    if spec is None:
        return {b: None for b in mc}
    if not mc:
        raise EvalError("--subjects selects MMLU / C-Eval subjects; add mmlu or ceval to --benchmark")
    tables = {"mmlu": MMLU_SUBJECTS, "ceval": CEVAL_SUBJECTS}
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    valid = sorted({s for b in mc for s in tables[b]})
    unknown = [s for s in names if s not in valid]
    if unknown or not names:
        raise EvalError(f"--subjects: unknown subject {unknown[0] if unknown else spec!r} for "
                        f"{' and '.join(mc)}; valid subjects: {', '.join(valid)}")
    out = {b: [s for s in names if s in tables[b]] for b in mc}
    for b, chosen in out.items():
        if not chosen:
            raise EvalError(f"--subjects names no {b} subject; add one or leave {b} out of --benchmark")
    return out


def check_args(args) -> list[str]:
    """The checks across flags and of the input paths, before anything is loaded (each numeric
    flag's own range is checked by the parser). Returns the benchmarks to run."""
    benches = parse_benchmarks(args.benchmark)
    args.subject_lists = parse_subjects(args.subjects, benches)
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
    common.check_plan(*output_plan(args), args.overwrite)  # refused now, not after an hour of scoring
    return benches


def output_plan(args) -> tuple[list, list]:
    """What evaluate writes (--json, --log-samples: JSON lines) and reads (--model, --hf, --data-dir)."""
    return ([common.Output(args.json, "--json", "json"), common.Output(args.log_samples, "--log-samples", "json")],
            [("--model", args.model), ("--hf", args.hf), ("--data-dir", args.data_dir)])


def load_gsm8k_data(data_dir, k: int) -> dict:
    """The GSM8K test rows and the shots' pool: the train split (the harness samples from it), or
    the built-in exemplars when that split is not available."""
    rows, train = load_gsm8k(data_dir, "test"), None
    if k > 0:
        try:
            train = load_gsm8k(data_dir, "train")
        except EvalError as e:
            warn(f"gsm8k: training split unavailable ({str(e).split(';')[0]}); using the first {k} built-in "
                 f"few-shot examples (evaluate.GSM8K_FEWSHOT): the prompts differ from lm-evaluation-harness's")
    pool = [(r["question"], r["answer"]) for r in train] if train else None
    return {"rows": rows, "pool": pool, "fewshot_source": "train split" if train else "built-in"}


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
        load = load_mmlu if b == "mmlu" else load_ceval
        return {"k": k, "data": load(d, need_dev=k > 0, subjects=args.subject_lists[b])}
    if b == "hellaswag":
        return {"k": k, "rows": load_hellaswag(d, "validation"), "train": load_hellaswag(d, "train") if k else []}
    if b == "gsm8k":
        return {"k": k, **load_gsm8k_data(d, k)}
    return {"k": k, **load_humaneval_data(d, args.limit, args.samples)}


def load_scorer(args) -> Scorer:
    """The model to score (--model or --hf) behind scoring's LM, on the resolved device/dtype."""
    torch.manual_seed(args.seed)
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    try:
        lm = scoring.load_lm(args.hf or args.model, device=str(device), dtype=dtype, hf=bool(args.hf),
                             dequantize=args.dequantize)
    except scoring.ScoringError as e:  # a model that cannot be loaded is bad input
        raise EvalError(common.one_line(e)) from None
    return Scorer(lm, batch_size=args.batch_size, progress=not args.quiet)


def max_new_tokens_for(b: str, args, ctx_len: int) -> int:
    """--max-new-tokens (or the benchmark's default). lm-evaluation-harness refuses a budget that leaves
    no room for the prompt (max_gen_toks >= the context); here it becomes half the context, with a warning."""
    n = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[b]
    if n >= ctx_len:
        warn(f"{b}: --max-new-tokens {n} leaves no room for a prompt in the model's {ctx_len}-token context "
             f"(lm-evaluation-harness refuses it); using {ctx_len // 2}")
        n = ctx_len // 2
    return n


def run_benchmark(b: str, d: dict, scorer: Scorer | None, args) -> tuple[dict, list[dict]]:
    """Score one benchmark from its loaded data `d`; returns (metrics, sample log)."""
    k = d["k"]
    if b in ("mmlu", "ceval"):
        return run_mmlu_like(scorer, b, d["data"], k, args.limit, args.drop_shots)
    if b == "hellaswag":
        return run_hellaswag(scorer, d["rows"], d["train"], k, args.limit, args.drop_shots, args.fewshot_seed)
    if b == "gsm8k":
        res, log = run_gsm8k(scorer, d["rows"], d["pool"], k, args.limit, max_new_tokens_for(b, args, scorer.ctx_len),
                             args.drop_shots, args.fewshot_seed)
        res["fewshot_source"] = d["fewshot_source"]
        return res, log
    samples, fit = d["samples"], {}
    if samples is None:
        n = max_new_tokens_for(b, args, scorer.ctx_len)
        samples = generate_humaneval_samples(scorer, d["problems"], args.num_samples, args.temperature, n, args.seed)
        fit = {**fit_report(b, samples, 0, scorer.ctx_len), "max_new_tokens": n}
    res, log = score_humaneval_samples(d["problems"], samples, timeout=args.exec_timeout,
                                       memory_mb=args.exec_memory_mb, workers=args.exec_workers,
                                       progress=not args.quiet)
    return {**res, **fit, "temperature": args.temperature}, log


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
                     "truncated", "fewshot_source", "max_new_tokens") or "stderr" in m or not isinstance(v, float):
                continue
            se = r.get(m.replace(",", "_stderr,", 1) if "," in m else f"{m}_stderr")
            se_s = f"{se:.4f}" if isinstance(se, float) else ""
            rows.append(f"| {task} | {m} | {v:.4f} | {se_s} | {r['n']} |")
        for g, gr in r.get("categories", {}).items():
            se = f"{gr['acc_stderr']:.4f}" if isinstance(gr["acc_stderr"], float) else ""
            rows.append(f"| {task}/{g} | acc | {gr['acc']:.4f} | {se} | {gr['n']} |")
    return "\n".join(rows)


def write_outputs(args, benches: list[str], results: dict, log: list[dict]) -> None:
    """--json (metrics and the run's settings) and --log-samples (one JSON object per line), atomically."""
    if args.json:
        out = {"model": args.model or args.hf or f"samples:{args.samples}",
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "config": {"benchmarks": benches, "data": args.data_dir or "huggingface hub", "limit": args.limit,
                          "subjects": args.subjects, "num_fewshot": args.num_fewshot, "drop_shots": args.drop_shots,
                          "fewshot_seed": args.fewshot_seed, "batch_size": args.batch_size, "device": args.device,
                          "seed": args.seed, "num_samples": args.num_samples, "temperature": args.temperature,
                          "exec_timeout": args.exec_timeout},
               "results": results}
        common.write_json(args.json, out)
    if args.log_samples:
        common.atomic_write_text(args.log_samples, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in log))


def evaluate_command(args) -> int:
    benches = check_args(args)
    results, log = evaluate(args, benches)
    print(format_table(results))
    write_outputs(args, benches, results, log)
    return common.EXIT_OK


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return common.run_cli(evaluate_command, args)


if __name__ == "__main__":
    sys.exit(main())
