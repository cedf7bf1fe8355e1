"""Evaluation: test AUC, log loss and accuracy, computed by scikit-learn.

Accuracy thresholds the predicted click probability at 0.5, as the DLRM reference does.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    both = len(np.unique(labels)) == 2
    return {
        "auc": float(roc_auc_score(labels, probs)) if both else float("nan"),
        "logloss": float(log_loss(labels, probs, labels=[0, 1])),
        "accuracy": float(accuracy_score(labels, probs >= 0.5)),
        "samples": int(len(labels)),
        "ctr": float(labels.mean()) if len(labels) else float("nan"),
    }


@torch.no_grad()
def predict(model, loader) -> tuple[np.ndarray, np.ndarray]:
    """Click probabilities and labels over a loader, in eval mode (state unchanged)."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    try:
        for batch in loader:
            probs.append(torch.sigmoid(model.forward_onehot(batch.dense, batch.cat)).numpy())
            labels.append(batch.label.numpy())
    finally:
        model.train(was_training)
    if not probs:
        return np.empty(0), np.empty(0)
    return np.concatenate(labels), np.concatenate(probs)


def evaluate(model, loader) -> dict:
    labels, probs = predict(model, loader)
    return classification_metrics(labels, probs)
