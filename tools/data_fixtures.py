"""Fixtures for flotilla's tokenizer and indexed-dataset tests, made by the real tools.

    python3 -m venv tools/.venv-data && tools/.venv-data/bin/pip install -r tools/requirements-data.txt
    tools/.venv-data/bin/python tools/data_fixtures.py model/tests/fixtures/data

Writes, deterministically:
- tokenizer.json: a byte-level BPE trained by the Python `tokenizers` library on
  generated text (asked for 384 ids, it reaches 368 on so little text), `<|endoftext|>`
  its only special token;
- tokens.json: strings, their ids under that tokenizer (no special tokens added) and the
  ids decoded back;
- docs.jsonl: documents, one JSON object per line (`text`);
- python_u16.{idx,bin}: those documents encoded, `<|endoftext|>` appended to each
  non-empty one, one sequence per document (none for the empty one), uint16 — what
  `preprocess_data.py --append-eod` writes;
- python_sentences.{idx,bin}: the same tokens in int32 with several sequences per document
  (as `--split-sentences` writes) and one empty document;
- expected.json: what each dataset holds.

The writer follows Megatron-LM's megatron/core/datasets/indexed_dataset.py
(`IndexedDatasetBuilder.add_document` + `finalize` → `_IndexWriter.write`) with NumPy, as
Megatron does; it is written here from the format, not copied.
"""

import json
import random
import struct
import sys
from pathlib import Path

import numpy
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HEADER = b"MMIDIDX\x00\x00"
CODES = {numpy.uint8: 1, numpy.int8: 2, numpy.int16: 3, numpy.int32: 4, numpy.int64: 5,
         numpy.float64: 6, numpy.float32: 7, numpy.uint16: 8}


def write_indexed(prefix, dtype, documents):
    """documents: a list of documents, each a list of sequences (lists of token ids)."""
    lengths, document_indices = [], [0]
    with open(f"{prefix}.bin", "wb") as data:
        for sequences in documents:
            for seq in sequences:
                data.write(numpy.array(seq, dtype=dtype).tobytes(order="C"))
                lengths.append(len(seq))
            document_indices.append(len(lengths))
    itemsize = numpy.int64(numpy.dtype(dtype).itemsize)
    pointers, ptr = [], numpy.int64(0)
    for n in lengths:
        pointers.append(ptr.item())
        ptr += n * itemsize
    with open(f"{prefix}.idx", "wb") as idx:
        idx.write(HEADER)
        idx.write(struct.pack("<Q", 1))
        idx.write(struct.pack("<B", CODES[dtype]))
        idx.write(struct.pack("<Q", len(lengths)))
        idx.write(struct.pack("<Q", len(document_indices)))
        idx.write(numpy.array(lengths, dtype=numpy.int32).tobytes(order="C"))
        idx.write(numpy.array(pointers, dtype=numpy.int64).tobytes(order="C"))
        idx.write(numpy.array(document_indices, dtype=numpy.int64).tobytes(order="C"))
    return lengths, document_indices


def words(rng, n):
    vocab = ["expert", "router", "token", "gate", "layer", "shard", "pipeline", "stage",
             "gradient", "loss", "batch", "the", "a", "of", "to", "and", "in", "is",
             "mixture", "latent", "attention", "scale", "block", "eight", "bits"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def main(out):
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(15)
    corpus = [words(rng, rng.randint(5, 40)) + "." for _ in range(400)]

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    eod = tokenizer.token_to_id("<|endoftext|>")

    strings = ["the expert router", "Mixture of Experts — 混合专家", "gradient  loss\n\tscale",
               "", "unseen wordz 123 <|endoftext|> after"]
    cases = []
    for s in strings:
        ids = tokenizer.encode(s, add_special_tokens=False).ids
        cases.append({"text": s, "ids": ids, "decoded": tokenizer.decode(ids, skip_special_tokens=False)})
    (out / "tokens.json").write_text(json.dumps({"vocab_size": tokenizer.get_vocab_size(True),
                                                 "eod": eod, "cases": cases}, indent=1,
                                                ensure_ascii=False) + "\n")

    texts = [words(rng, rng.randint(20, 60)) + "." for _ in range(12)] + ["", "ünïcode — 专家"]
    with open(out / "docs.jsonl", "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"id": len(t), "text": t}, ensure_ascii=False) + "\n")
    # preprocess_data.py --append-eod appends the token to non-empty documents only; an
    # empty one is a document without sequences.
    docs = [ids + [eod] if ids else [] for ids in (tokenizer.encode(t, add_special_tokens=False).ids
                                                    for t in texts)]

    expected = {}
    lengths, index = write_indexed(out / "python_u16", numpy.uint16, [[d] if d else [] for d in docs])
    expected["python_u16"] = {"dtype": "uint16", "dtype_code": 8, "sequence_lengths": lengths,
                              "document_index": index, "documents": docs}
    # Several sequences per document (cut at every 7th token), and an empty document.
    split = [[d[i:i + 7] for i in range(0, len(d), 7)] for d in docs[:5]] + [[]] + [[d] for d in docs[5:]]
    lengths, index = write_indexed(out / "python_sentences", numpy.int32, split)
    expected["python_sentences"] = {"dtype": "int32", "dtype_code": 4, "sequence_lengths": lengths,
                                    "document_index": index,
                                    "documents": [[t for s in d for t in s] for d in split]}
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "model/tests/fixtures/data"))
