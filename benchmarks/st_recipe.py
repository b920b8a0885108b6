"""The same recipe through sentence-transformers: the other thing users would otherwise run (`gpu_suite.py`'s
`st` rows).

sentence-transformers has no Mirror-BERT loss; its way to train an encoder without labels on duplicated
strings is the SimCSE recipe of its documentation: (text, positive) pairs with
`MultipleNegativesRankingLoss` (in-batch negatives, cosine similarity x scale), trained by
`SentenceTransformerTrainer` (the Hugging Face Trainer). Here the positive is the Mirror-BERT view: the
text with one random 5-character span masked (`reference_mask_span`, drawn once: the dataset is static),
scale = 1 / T = 25, the model the same directory with [CLS] pooling, max_seq_length 50, dropout 0.1,
AdamW lr 2e-5, weight decay 0.01, constant learning rate, batch 200 pairs (400 views), fp16 on CUDA
(fp32 on the CPU), the trainer's own shuffling (seed 42). The loss differs from NT-Xent: each anchor
is scored against the batch's positives only (N - 1 negatives, not 2N - 2), in one direction.
Needs `pip install "sentence-transformers[train]"` (datasets, accelerate).
"""

from __future__ import annotations

import random
import tempfile
import time

import torch

from reference_recipe import ReferenceRecipe, reference_mask_span, sync


def st_train(model_dir, texts: list[str], device: torch.device, epochs: int, recipe: ReferenceRecipe,
             after_epoch=None) -> dict:
    """Train with SentenceTransformerTrainer; the result has reference_train's keys, with no per-step
    losses (the trainer logs none unless asked, and then syncs every step; MNRL's values are not NT-Xent's
    anyway). after_epoch(epoch, model, tokenizer) runs outside the epoch timer."""
    try:
        from datasets import Dataset
    except ImportError as exc:  # the GPU image has sentence-transformers without it (H100, 2026-11-27)
        raise RuntimeError("the sentence-transformers rows need `datasets` (its trainer's input format): "
                           "pip install datasets") from exc
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses, models)
    from transformers import TrainerCallback

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    args = {"attention_probs_dropout_prob": recipe.dropout, "hidden_dropout_prob": recipe.dropout}
    encoder = models.Transformer(str(model_dir), max_seq_length=recipe.max_length, config_args=args)
    pooling = models.Pooling(encoder.get_word_embedding_dimension(), pooling_mode="cls")
    model = SentenceTransformer(modules=[encoder, pooling], device=str(device))
    tokenizer = encoder.tokenizer
    rng = random.Random(recipe.seed + 1)
    positives = [reference_mask_span(t, recipe.mask_span, tokenizer.mask_token, rng, recipe.min_length_to_mask)
                 for t in texts]
    data = Dataset.from_dict({"anchor": texts, "positive": positives})
    # Real tokens per epoch (both views, truncated as the model truncates): counted once, outside the timers.
    lengths = tokenizer(texts + positives, truncation=True, max_length=recipe.max_length,
                        return_attention_mask=False)["input_ids"]
    tokens_per_epoch = sum(map(len, lengths))

    epoch_seconds: list[float] = []

    class EpochTimer(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            sync(device)
            self.start = time.perf_counter()
            if not epoch_seconds:
                self.setup = self.start - t0

        def on_epoch_end(self, args, state, control, **kwargs):
            sync(device)
            epoch_seconds.append(time.perf_counter() - self.start)
            if after_epoch is not None:
                after_epoch(len(epoch_seconds) - 1, encoder.auto_model, tokenizer)  # the trainer sets train() again

    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as scratch:
        arguments = SentenceTransformerTrainingArguments(
            output_dir=scratch, num_train_epochs=epochs, per_device_train_batch_size=recipe.batch_size,
            learning_rate=recipe.lr, weight_decay=recipe.weight_decay, lr_scheduler_type="constant",
            fp16=device.type == "cuda", seed=recipe.seed, save_strategy="no",
            report_to="none", disable_tqdm=True, logging_strategy="no", use_cpu=device.type == "cpu",
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=arguments, train_dataset=data,
            loss=losses.MultipleNegativesRankingLoss(model, scale=1.0 / recipe.temperature), callbacks=[timer],
        )
        result = trainer.train()
    steps = result.global_step // epochs
    return {"setup_seconds": timer.setup, "epoch_seconds": epoch_seconds, "epoch_steps": [steps] * epochs,
            "epoch_tokens": [tokens_per_epoch] * epochs, "losses": [],
            "model": encoder.auto_model, "tokenizer": tokenizer}


if __name__ == "__main__":
    import sys

    from script_main import module_only

    sys.exit(module_only("st_recipe.py",
                         "the sentence-transformers recipe for gpu_suite.py; run "
                         "python benchmarks/gpu_suite.py (--tiny on a CPU)"))
