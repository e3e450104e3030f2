"""SQuAD v1.1 recast as instruction data: prompt (question + context) → response (answer).

    python data/squad-instruct/make_instruction.py

Reads the bundled SQuAD slice (``data/squad/train.json``, ``dev.json``, split by article) and
writes ``train.jsonl`` and ``dev.jsonl`` here, one JSON object per question, in the columns
of makd's ``instruction`` task: ``instruction`` (the question), ``input`` (its paragraph),
``output`` (the first reference answer), plus ``answers`` (every reference answer, for
Rouge-L against several), ``id`` and ``title``. The split stays by article: no article, and
so no paragraph, is in both files. Deterministic: the same input gives the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SQUAD = HERE.parent / "squad"


def rows(squad_file: Path) -> list[dict]:
    data = json.loads(squad_file.read_text(encoding="utf-8"))
    out = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [a["text"] for a in qa["answers"]]
                out.append(
                    {
                        "id": qa["id"],
                        "title": article["title"],
                        "instruction": qa["question"].strip(),
                        "input": paragraph["context"],
                        "output": answers[0],
                        "answers": answers,
                    }
                )
    return out


def main() -> None:
    for split in ("train", "dev"):
        lines = [json.dumps(r, ensure_ascii=False) for r in rows(SQUAD / f"{split}.json")]
        (HERE / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{split}.jsonl: {len(lines)} rows")


if __name__ == "__main__":
    main()
