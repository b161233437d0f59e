"""PPO's critic: a value head on the policy's own last hidden states (serves `needs_value_model`).

PPO (DESIGN §6, the notes' four models) needs a critic V(s_t): the expected return from the
state before completion token t. prefopt's critic shares the actor's backbone, as TRL's
classic `AutoModelForCausalLMWithValueHead` does: a Linear(hidden, 1) reads the hidden state
that predicts token t, so one forward pass gives both log pi(y_t | ...) and V(s_t), and the
value loss trains the head and, through the states, the backbone (or its LoRA adapter). The
critic costs hidden + 1 parameters and no second forward; the price is that the value loss
shares the backbone with the policy, which `vf_coef` weighs (TRL's old PPOTrainer did the
same). The head is trained by the same optimizer as the policy, saved beside each checkpoint
(`value_head.safetensors`, restored on --resume) and into final/.
"""

from __future__ import annotations

from pathlib import Path

import torch

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(torch.nn.Module):
    """V(s) = w . h + b on the last hidden state h; starts at V = 0 (w = 0, b = 0) so the first
    advantages are the returns themselves rather than noise from a random head."""

    def __init__(self, width: int):
        super().__init__()
        self.summary = torch.nn.Linear(width, 1)
        torch.nn.init.zeros_(self.summary.weight)
        torch.nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(K, width) states -> (K,) float32 values: the head runs in fp32 whatever the backbone's dtype,
        also under mixed precision's autocast (which would otherwise run this Linear in bf16)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.summary(hidden.float()).squeeze(-1)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(folder / VALUE_HEAD_FILE)
        )

    def load(self, folder: Path) -> bool:
        """Load the head saved in `folder` (True), or leave it as it is when none was saved (False)."""
        path = Path(folder) / VALUE_HEAD_FILE
        if not path.exists():
            return False
        from safetensors.torch import load_file

        state = load_file(str(path), device=str(self.summary.weight.device))
        self.load_state_dict(state)
        return True


def value_head_for(model, use_logits: bool) -> ValueHead:
    """A fresh head sized for `model`'s completion states (hidden size; vocabulary size when the
    trainer scores from logits), on the model's device."""
    from prefopt.models.logps import output_head

    head = output_head(model)
    width = head.out_features if use_logits else head.in_features
    return ValueHead(width).to(next(model.parameters()).device)


def value_head_callback(critic: ValueHead):
    """The Trainer clips and zeroes the model's gradients only; this does both for the head: clipped
    to the same max_grad_norm before each optimizer step, zeroed after it (else they would add up
    across steps)."""
    from transformers import TrainerCallback

    class ValueHeadGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if args.max_grad_norm and args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)

        def on_optimizer_step(self, args, state, control, **kwargs):
            critic.zero_grad(set_to_none=True)

    return ValueHeadGradients()
