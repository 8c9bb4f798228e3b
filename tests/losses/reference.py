"""Plain numpy (float64, explicit loops) references for the metric losses.

Written from the formulas of the paper (DVML §3.1 and its cited losses), independently of
dvml_tf.losses: loops over anchors/pairs instead of masks and broadcasting.
"""

import itertools

import numpy as np


def normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def squared_distance(a, b):
    return float(np.sum((a - b) ** 2))


def triplet_all(x, labels, margin):
    terms = []
    n = len(labels)
    for a, p, q in itertools.product(range(n), repeat=3):
        if a != p and labels[a] == labels[p] and labels[q] != labels[a]:
            d_ap = squared_distance(x[a], x[p])
            d_an = squared_distance(x[a], x[q])
            terms.append(max(margin + d_ap - d_an, 0.0))
    return float(np.mean(terms))


def triplet_semihard(x, labels, margin):
    terms = []
    n = len(labels)
    for a, p in itertools.product(range(n), repeat=2):
        if a == p or labels[a] != labels[p]:
            continue
        d_ap = squared_distance(x[a], x[p])
        negatives = [squared_distance(x[a], x[q]) for q in range(n) if labels[q] != labels[a]]
        farther = [d for d in negatives if d > d_ap]
        d_an = min(farther) if farther else max(negatives)
        terms.append(max(margin + d_ap - d_an, 0.0))
    return float(np.mean(terms))


def npair(x, labels, l2_reg, temperature=1.0):
    anchors, positives = x[0::2], x[1::2]
    n = len(anchors)
    total = 0.0
    for i in range(n):
        s_ii = anchors[i] @ positives[i] / temperature
        total += np.log(
            1.0
            + sum(
                np.exp(anchors[i] @ positives[j] / temperature - s_ii) for j in range(n) if j != i
            )
        )
    loss = total / n
    mean_sq_a = np.mean([v @ v for v in anchors])
    mean_sq_p = np.mean([v @ v for v in positives])
    return float(loss + 0.25 * l2_reg * (mean_sq_a + mean_sq_p))


def contrastive(x, labels, margin):
    pos, neg = [], []
    n = len(labels)
    for i, j in itertools.product(range(n), repeat=2):
        if i == j:
            continue
        d = np.sqrt(squared_distance(x[i], x[j]))
        if labels[i] == labels[j]:
            pos.append(d**2)
        else:
            neg.append(max(margin - d, 0.0) ** 2)
    return float(np.mean(pos) + np.mean(neg))


def dws_log_weights(x, labels, cutoff, nonzero_loss_cutoff):
    """Row-wise log sampling weights (unnormalized), -inf where not drawable."""
    n, dim = x.shape
    out = np.full((n, n), -np.inf)
    for a in range(n):
        allowed = []
        for q in range(n):
            if labels[q] == labels[a]:
                continue
            d = np.sqrt(squared_distance(x[a], x[q]))
            if d >= nonzero_loss_cutoff:
                continue
            dc = max(d, cutoff)
            log_q = (dim - 2) * np.log(dc) + (dim - 3) / 2 * np.log(1 - dc**2 / 4)
            allowed.append((q, -log_q))
        if allowed:
            top = max(w for _, w in allowed)
            for q, w in allowed:
                out[a, q] = w - top
        else:  # uniform over the negatives
            for q in range(n):
                if labels[q] != labels[a]:
                    out[a, q] = 0.0
    return out


def triplet2_dws(x, labels, negatives, margin):
    """negatives[a, j]: the negative drawn for anchor a in the slot of positive j."""
    terms = []
    n = len(labels)
    for a, p in itertools.product(range(n), repeat=2):
        if a != p and labels[a] == labels[p]:
            d_ap = np.sqrt(squared_distance(x[a], x[p]))
            d_an = np.sqrt(squared_distance(x[a], x[negatives[a, p]]))
            terms.append(max(margin + d_ap - d_an, 0.0))
    return float(np.mean(terms))


def margin_dws(x, labels, negatives, margin, beta, nu=0.0):
    terms = []
    n = len(labels)
    for a, p in itertools.product(range(n), repeat=2):
        if a != p and labels[a] == labels[p]:
            d_ap = np.sqrt(squared_distance(x[a], x[p]))
            d_an = np.sqrt(squared_distance(x[a], x[negatives[a, p]]))
            terms.append(max(margin + d_ap - beta, 0.0))
            terms.append(max(margin + beta - d_an, 0.0))
    active = sum(t > 0 for t in terms)
    return float(sum(terms) / active if active else 0.0) + nu * beta


def numerical_gradient(function, x, step=1e-6):
    """Central finite differences of a scalar function of an array."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (function(plus) - function(minus)) / (2 * step)
    return grad
