"""Cut the bundled SQuAD v1.1 slice out of the official dev set, split by article.

    python data/squad/make_slice.py ../shared/data/SQuAD-v1.1/dev-v1.1.json

writes ``train.json`` and ``dev.json`` next to this script: the articles named below, whole
and in the official order, in SQuAD v1.1 JSON (``{"data": [...], "version": "1.1"}``,
UTF-8, no indentation). No article is in both files. Every answer span is checked against
its context.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

#: official dev-v1.1.json, as described in ../shared/data/README.md
SHA256 = "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"
TRAIN = ["Southern_California", "Amazon_rainforest", "Ctenophora", "Prime_number", "Rhine"]
DEV = ["Black_Death", "Packet_switching"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the official SQuAD v1.1 dev-v1.1.json")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    blob = args.source.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{args.source}: sha256 {digest}, not the official file's {SHA256}")
    if set(TRAIN) & set(DEV):
        raise SystemExit(f"articles in both splits: {sorted(set(TRAIN) & set(DEV))}")
    articles = {a["title"]: a for a in json.loads(blob)["data"]}
    for name, titles in (("train", TRAIN), ("dev", DEV)):
        chosen = [articles[t] for t in articles if t in titles]  # official order
        if len(chosen) != len(titles):
            raise SystemExit(f"missing articles: {sorted(set(titles) - set(articles))}")
        questions = 0
        for article in chosen:
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    questions += 1
                    for answer in qa["answers"]:
                        start, text = answer["answer_start"], answer["text"]
                        if context[start : start + len(text)] != text:
                            raise SystemExit(f"{qa['id']}: answer {text!r} not at {start}")
        path = args.out / f"{name}.json"
        text = json.dumps({"data": chosen, "version": "1.1"}, ensure_ascii=False)
        path.write_text(text + "\n", encoding="utf-8")
        paragraphs = sum(len(a["paragraphs"]) for a in chosen)
        print(
            f"{path}: {len(chosen)} articles, {paragraphs} paragraphs, {questions} questions, "
            f"{path.stat().st_size:,} bytes"
        )


if __name__ == "__main__":
    main()
