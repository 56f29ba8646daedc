"""Prepare-stage tokenization speed against a plain ``datasets.map(batched=True)``, same corpus, same run.

    PYTHONPATH=src python benchmarks/prepare_speed.py --base models/base --copies 45 --repeats 3

The corpus is the Python reference manual (builtin:python-docs) repeated ``--copies`` times,
each copy's documents suffixed so that none is a duplicate. Both sides tokenize the same
texts with the same fast tokenizer; the figures are the best of ``--repeats`` runs,
interleaved so that both see the same machine load.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="model directory whose tokenizer is used")
    parser.add_argument("--copies", type=int, default=45)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    import datasets
    from transformers import AutoTokenizer

    from qlorapipe.params import DataParams
    from qlorapipe.prepare import examples, sources
    from qlorapipe.prepare import rows as row_layout

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    topics = [r.columns["text"] for r in sources.python_docs_records()]
    records = [sources.Record({"text": f"{text}\n({copy})"}, f"copy {copy}")
               for copy in range(args.copies) for text in topics]
    texts = [r.columns["text"] for r in records]
    params = DataParams(max_length=512)
    ours, plain, n_tokens = [], [], 0
    for _ in range(args.repeats):
        started = time.perf_counter()
        docs, _ = examples.text_documents(records, tokenizer, params)
        rows, _ = row_layout.chunk_stream(docs, params.max_length)
        ours.append(time.perf_counter() - started)
        n_tokens = sum(len(d.input_ids) for d in docs)

        started = time.perf_counter()
        dataset = datasets.Dataset.from_dict({"text": texts})
        dataset.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"],
                    keep_in_memory=True)
        plain.append(time.perf_counter() - started)
    print(f"corpus: {len(texts)} documents, {n_tokens:,} tokens; cpu cores: {os.cpu_count()}")
    print(f"qlorapipe text_documents + chunk_stream: best {min(ours):.2f} s ({n_tokens / min(ours):,.0f} tokens/s)")
    print(f"datasets.map(batched=True) tokenization: best {min(plain):.2f} s ({n_tokens / min(plain):,.0f} tokens/s)")


if __name__ == "__main__":
    main()
