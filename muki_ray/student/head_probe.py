"""The warm start's linear probe: re-fit a grown student's head on its own features, before training.

Why. A student warm-started from a previous run (`student.init_from`) keeps its trained body and
head rows, and the new labels get fresh rows near 0. The old rows were trained to large margins,
so every new-label text starts on an old label; Adam moves a weight by about the learning rate per
step, so in a short run the fresh rows never catch up (measured: a warm student scored 0.03 on the new
labels' test texts where a student from scratch on the same targets scored 0.82; the probe's
`before` report in train_log.jsonl shows the cause on each run: the share of new-label texts the
copied head sends to a new label, and the mean margin by which an old label wins).
This is the norm imbalance that class-incremental learning knows (Hou et al. 2019; Zhao et al.
2020, weight aligning), and the head-feature mismatch that LP-FT fixes by fitting a linear probe
on the frozen features before fine-tuning (Kumar et al., ICLR 2022).

What. With the previous student's features h (the head's input) of a sample of pool rows and their
targets t, fit the union head (W, b) by

    min_{W,b}  (1/N) Σ_n β_n w_n KL(t_n ‖ softmax(W h_n + b)) + (λ/2) (r² ‖W - W0‖² + ‖b - b0‖²)

where W0, b0 are the old rows (copied by label name) and 0 for new rows: the student's own loss,
convex in (W, b), so full-batch L-BFGS solves it in a few dozen steps.
- The pull towards W0 keeps the old rows where the targets do not ask them to move. It is scaled by
  r² = mean ‖h - mean h‖², the features' spread, so it costs the same per unit of logit margin
  between texts whatever the features' scale and common offset.
- β_n balances the labels: each target label (argmax) weighs the same in the fit, whatever its
  share of the sample. Without it a label on 10% of the rows is outweighed by the pull (measured on
  the tiny test student: its new-label rows stayed on old labels, margin -0.70; balanced, all of
  them moved to a new label, margin +1.09). The student's training that follows is not balanced.
Pure torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

L2 = 1e-3   # λ: a mild pull towards the previous head (and 0 for new rows)
STEPS = 100  # L-BFGS iterations (converged well before on every probe measured)


@dataclass
class HeadFit:
    weight: np.ndarray   # (Y, H) the fitted union head
    bias: np.ndarray     # (Y,)
    report: dict         # what the probe changed (probe_report)


def soft_kl(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ w_n KL(t_n ‖ softmax(logits_n)); logits, targets (N, Y), weights (N,)."""
    log_q = F.log_softmax(logits, dim=-1)
    return ((torch.xlogy(targets, targets) - targets * log_q).sum(-1) * weights).mean()


def label_balance(targets: np.ndarray) -> np.ndarray:
    """(N, Y) targets -> (N,) β: N / (labels present x rows of the row's argmax label), so every
    target label present weighs N / labels present in all."""
    goal = np.asarray(targets).argmax(1)
    counts = np.bincount(goal, minlength=np.asarray(targets).shape[1]).astype(np.float64)
    return len(goal) / (np.count_nonzero(counts) * counts[goal]) if len(goal) else np.zeros(0)


def fit_head(features: np.ndarray, targets: np.ndarray, weights: np.ndarray, weight0: np.ndarray,
             bias0: np.ndarray, new_rows: np.ndarray, *, l2: float = L2, steps: int = STEPS,
             balance: bool = True) -> HeadFit:
    """Fit the union head on fixed features.

    features (N, H), targets (N, Y) rows summing to 1, weights (N,) >= 0, weight0 (Y, H) and bias0
    (Y,) the starting head (old rows copied, new rows 0), new_rows (Y,) bool; `balance`: β as in
    the module docstring (else 1). Returns the fitted head in float32 and `probe_report` of the
    starting and the fitted head.
    """
    h = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    t = torch.as_tensor(np.asarray(targets), dtype=torch.float64)
    beta = label_balance(targets) if balance else np.ones(len(h))
    w = torch.as_tensor(np.asarray(weights) * beta, dtype=torch.float64)
    r2 = float((h - h.mean(0)).square().sum(-1).mean()) if len(h) > 1 else 1.0
    w0 = torch.as_tensor(np.asarray(weight0), dtype=torch.float64)
    b0 = torch.as_tensor(np.asarray(bias0), dtype=torch.float64)
    W, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = soft_kl(h @ W.T + b, t, w) + 0.5 * l2 * (r2 * (W - w0).square().sum() + (b - b0).square().sum())
        loss.backward()
        return loss

    if len(h):
        opt.step(closure)
    W, b = W.detach(), b.detach()
    report = {"before": probe_report(h @ w0.T + b0, t, w0, new_rows),
              "after": probe_report(h @ W.T + b, t, W, new_rows), "rows": int(len(h)), "l2": l2,
              "balanced": balance}
    return HeadFit(W.float().numpy(), b.float().numpy(), report)


def probe_report(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, new_rows) -> dict:
    """What a head does on the probe rows.

    - `agreement`: the share of rows whose argmax is the target's;
    - `new_rows_on_new`: of the rows whose target is a new label, the share predicted as a new label;
    - `new_margin`: on those rows, the mean of (best new logit - best old logit): < 0 when the old
      labels win;
    - `row_norm_old` / `row_norm_new`: the mean L2 norm of the old and of the new rows.
    """
    new = torch.as_tensor(np.asarray(new_rows), dtype=torch.bool)
    pred, goal = logits.argmax(-1), targets.argmax(-1)
    on_new = new[goal] if len(goal) else torch.zeros(0, dtype=torch.bool)
    out = {"agreement": float((pred == goal).double().mean()) if len(goal) else None,
           "new_label_rows": int(on_new.sum()),
           "new_rows_on_new": float(new[pred[on_new]].double().mean()) if on_new.any() else None,
           "new_margin": float((logits[on_new][:, new].max(-1).values - logits[on_new][:, ~new].max(-1).values)
                               .mean()) if on_new.any() and (~new).any() else None,
           "row_norm_old": float(weight[~new].norm(dim=-1).mean()) if (~new).any() else None,
           "row_norm_new": float(weight[new].norm(dim=-1).mean()) if new.any() else None}
    return out
