"""Knowledge distillation (``train.distill_from``): a student learns from a teacher's predictions.

Besides the next token of the data, each position of a batch tells the student what a bigger
model (the teacher) thinks could come next: its whole distribution over the vocabulary, which
carries more information per token than the one right answer (Hinton et al. 2015). The loss mixes
the two,

    loss = (1 - alpha) * CE(student, data) + alpha * T^2 * KL(teacher_T || student_T)

where ``_T`` is the softmax at temperature ``T`` (``train.distill_temperature``; the T^2 keeps
the gradient's scale as T changes) and ``alpha`` is ``train.distill_alpha``. The teacher is any
model ``model.init_from`` could start from (an lmtrain run or checkpoint, or a Hugging Face
directory) with the student's exact tokenizer; it runs in inference mode, in the training
precision, on the same batches, on every rank. Val loss and bpb stay the plain cross-entropy on
the data, so distilled and undistilled runs compare; the train loss logged is the mixed one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lmtrain.errors import CheckpointError, ConfigError
from lmtrain.lora import fingerprint
from lmtrain.loss import IGNORE_INDEX


class Teacher:
    """The frozen teacher model, and its next-token logits for a batch. ``record`` says which it
    is (where it was read from, and a fingerprint of its weights): every checkpoint keeps it, and a
    run resumes only on the same teacher."""

    def __init__(self, model: torch.nn.Module, record: dict[str, str]) -> None:
        self.model, self.record = model, record

    @torch.no_grad()
    def logits(self, idx: torch.Tensor, layout=None) -> torch.Tensor:
        logits, _ = self.model(idx) if layout is None else self.model(idx, layout=layout)
        return logits


def load_teacher(distill_from: str, tokenizer_file, device: torch.device) -> Teacher:
    """The model ``train.distill_from`` names, on ``device``, frozen; refused (one line) unless its
    tokenizer is the run's (``tokenizer_file``) token for token."""
    from tokenizers import Tokenizer

    from lmtrain.model import GPT, GPTConfig
    from lmtrain.pretrained import open_source
    from lmtrain.restore import Pretrained

    key = "train.distill_from"
    source = open_source(distill_from, key)
    theirs = Tokenizer.from_file(str(source.tokenizer_file)).get_vocab(with_added_tokens=True)
    ours = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    if theirs != ours:
        differ = sorted(set(theirs.items()) ^ set(ours.items()))[:2]
        raise ConfigError(f"{key} {distill_from}: its tokenizer differs from the run's ({len(theirs)} tokens against "
                          f"{len(ours)}; e.g. {differ}): a teacher's predictions are over its own tokens, so it "
                          "must share the student's tokenizer")
    try:
        config = GPTConfig(**source.fields)
    except TypeError as exc:
        raise ConfigError(f"{key} {distill_from}: unreadable model config ({exc})") from None
    model = GPT(config)
    Pretrained(source).weights(model)
    record = {"distill_from": distill_from, "fingerprint": fingerprint(model)}
    model.to(device).eval().requires_grad_(False)
    return Teacher(model, record)


def check_same_teacher(saved: dict[str, Any] | None, teacher: Teacher | None, path) -> None:
    """A distilled run resumes only on the teacher it was trained with: the student's every step
    depends on the teacher's logits, and a teacher that trained on since would make a resumed run
    differ from an uninterrupted one in every tensor."""
    if saved is None and teacher is None:
        return
    now = teacher.record if teacher is not None else None
    if not isinstance(saved, dict) or now is None or saved.get("fingerprint") != now["fingerprint"]:
        was = f"{saved.get('distill_from')} (fingerprint {str(saved.get('fingerprint'))[:12]})" \
            if isinstance(saved, dict) else "no teacher"
        is_ = f"{now['distill_from']} (fingerprint {now['fingerprint'][:12]})" if now is not None else "no teacher"
        raise CheckpointError(f"cannot resume from {path}: it was distilled from {was}, and the config now gives "
                              f"{is_}; point train.distill_from back at that teacher, or use --restart to start "
                              "over (the old checkpoints are kept aside)")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      alpha: float, temperature: float) -> torch.Tensor:
    """The mixed loss above, averaged over positions (both logits over the same vocabulary)."""
    vocab = student_logits.size(-1)
    student = student_logits.float().reshape(-1, vocab)
    loss = F.cross_entropy(student, targets.reshape(-1)) if alpha < 1 else student.new_zeros(())
    if alpha > 0:
        teacher = teacher_logits.float().reshape(-1, vocab)
        flat = targets.reshape(-1)
        if bool((flat == IGNORE_INDEX).any()):  # chat: the KL covers the trained positions only, like the CE
            keep = flat != IGNORE_INDEX
            student, teacher = student[keep], teacher[keep]
        kl = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                      log_target=True, reduction="batchmean")  # batchmean over rows: per position
        loss = (1 - alpha) * loss + alpha * temperature ** 2 * kl
    return loss
