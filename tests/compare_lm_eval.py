"""Check benchmark.py's MMLU against lm-evaluation-harness, question by question.

    python -m tests.compare_lm_eval tasks --mmlu-data ../shared/data/mmlu --out /tmp/lmeval-tasks
    lm_eval --model hf --model_args pretrained=/tmp/smollm2-135m,dtype=float32 --include_path /tmp/lmeval-tasks \\
        --tasks localmmlu_abstract_algebra,... --num_fewshot 0 --limit 100 --log_samples --output_path /tmp/lm0
    python -m tests.compare_lm_eval compare results/benchmark-....json --shots 0 --samples /tmp/lm0

Not collected by pytest (it needs lm-eval installed in a separate environment). `tasks` writes one
lm-eval task per subject whose template is lm-eval's `mmlu/default/_default_template_yaml` verbatim,
with the data pointed at JSON-lines made from the local CSVs (choices kept as strings, as in cais/mmlu).
`compare` reads lm-eval's --log_samples files and prints matching predictions per subject.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mmlu

TEMPLATE = """task: localmmlu_{subject}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/test/{subject}.jsonl
    dev: {data}/dev/{subject}.jsonl
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
description: "The following are multiple choice questions (with answers) about {spaced}.\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tasks(args) -> None:
    out = Path(args.out)
    for subject in args.subjects:
        for split in ("test", "dev"):
            rows = mmlu.load_split(subject, split, args.mmlu_data)
            (out / "data" / split).mkdir(parents=True, exist_ok=True)
            lines = [json.dumps({"question": r["question"], "subject": subject, "choices": r["choices"],
                                 "answer": r["answer"]}) for r in rows]
            (out / "data" / split / f"{subject}.jsonl").write_text("\n".join(lines) + "\n")
        text = TEMPLATE.format(subject=subject, data=(out / "data").resolve(), spaced=mmlu.format_subject(subject))
        (out / f"localmmlu_{subject}.yaml").write_text(text)
    print(f"wrote {len(args.subjects)} tasks to {out}: --tasks " + ",".join(f"localmmlu_{s}" for s in args.subjects))


def lm_eval_samples(samples_dir: Path) -> dict[tuple[str, int], dict]:
    """(subject, doc_id) -> lm-eval's context string and the four log-likelihoods it logged."""
    samples = {}
    for path in samples_dir.rglob("samples_localmmlu_*.jsonl"):
        subject = path.name[len("samples_localmmlu_"):].rsplit("_", 1)[0]
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            lls = [float(resp[0]) for resp in sample["filtered_resps"]]
            samples[(subject, int(sample["doc_id"]))] = {
                "context": sample["arguments"]["gen_args_0"]["arg_0"], "loglikelihoods": lls,
                "prediction": mmlu.LETTERS[max(range(4), key=lambda i: lls[i])]}
    return samples


def compare(args) -> int:
    data = json.loads(Path(args.run).read_text())
    theirs = lm_eval_samples(Path(args.samples))
    total = same = same_prompt = 0
    largest = 0.0
    per_subject: dict[str, list[int]] = {}
    for entry in data["models"].values():
        for q in entry["mmlu"][str(args.shots)]["questions"]:
            key = (q["subject"], q["index"])
            if key not in theirs:
                continue
            lm = theirs[key]
            total += 1
            same += lm["prediction"] == q["prediction"]
            largest = max(largest, max(abs(a - b) for a, b in zip(lm["loglikelihoods"], q["loglikelihoods"])))
            counts = per_subject.setdefault(q["subject"], [0, 0])
            counts[0] += lm["prediction"] == q["prediction"]
            counts[1] += 1
            if args.mmlu_data:
                docs = mmlu.load_split(q["subject"], "test", args.mmlu_data)
                shots = mmlu.load_split(q["subject"], "dev", args.mmlu_data)[:args.shots]
                same_prompt += mmlu.build_prompt(q["subject"], docs[q["index"]], shots) == lm["context"]
            if lm["prediction"] != q["prediction"]:
                print(f"differs: {key} ours {q['prediction']} {q['loglikelihoods']} lm-eval {lm['prediction']} "
                      f"{lm['loglikelihoods']}")
    for subject, (s, n) in sorted(per_subject.items()):
        print(f"{subject:28s} {s}/{n} identical predictions")
    print(f"{args.shots}-shot: {same}/{total} predictions identical to lm-eval; largest log-likelihood "
          f"difference {largest:.1e}" + (f"; {same_prompt}/{total} prompts byte-identical" if args.mmlu_data else ""))
    return 0 if total and same == total else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tasks = sub.add_parser("tasks")
    tasks.add_argument("--mmlu-data", required=True)
    tasks.add_argument("--subjects", nargs="+", default=list(mmlu.DEFAULT_SUBJECTS))
    tasks.add_argument("--out", required=True)
    cmp = sub.add_parser("compare")
    cmp.add_argument("run", help="benchmark.py results JSON")
    cmp.add_argument("--shots", type=int, required=True)
    cmp.add_argument("--samples", required=True, help="lm-eval --output_path folder with samples_*.jsonl")
    cmp.add_argument("--mmlu-data", default=None, help="also check every prompt byte for byte")
    args = parser.parse_args(argv)
    if args.command == "tasks":
        write_tasks(args)
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
