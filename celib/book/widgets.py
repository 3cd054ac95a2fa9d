"""Self-contained interactive figures: plain HTML, SVG and a few lines of JavaScript.

They need no kernel and no network, so they work in the static HTML book and in
a notebook alike. Every number they show is computed here, in Python, by
:mod:`celib.ref`; the JavaScript only looks values up.
"""

from __future__ import annotations

import html
import json

import numpy as np

from celib import ref

__all__ = ["MARKED", "penalty_of_confidence_html"]

#: Points marked on the penalty curve (predicted probability of the true class).
MARKED = (0.99, 0.6, 0.1, 0.01)


def _svg_xy(p: np.ndarray, loss: np.ndarray, y_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Map (probability, loss) to SVG coordinates in a 640x380 canvas with margins."""
    left, right, top, bottom = 60, 620, 20, 320
    x = left + p * (right - left)
    y = bottom - np.minimum(loss, y_max) / y_max * (bottom - top)
    return x, y


def penalty_of_confidence_html(element_id: str = "penalty-of-confidence") -> str:
    """HTML for "the penalty of confidence": the loss -log p of the true class, with a slider.

    The slider moves the predicted probability p of the true class from 0.01
    (left) up to 1.00 (right) in steps of 0.01, in the direction of the plot's
    x-axis; the marker on the curve and the readout (p and the loss in nats,
    to 2 decimals) follow it. The points in
    :data:`MARKED` are labelled with their losses. The loss is binary
    cross-entropy with true label 1, ``celib.ref.binary_cross_entropy(p, 1)``,
    which is exactly -log p.
    """
    y_max = 5.0
    steps = np.round(0.01 + np.arange(100) / 100, 2)  # slider position k -> p = (k + 1) / 100
    loss_at = ref.binary_cross_entropy(steps, np.ones_like(steps), reduction="none")
    curve_p = np.linspace(np.exp(-y_max), 1.0, 300)
    curve_x, curve_y = _svg_xy(curve_p, ref.binary_cross_entropy(curve_p, np.ones_like(curve_p), reduction="none"), y_max)
    path = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in zip(curve_x, curve_y))
    marks = np.array(MARKED)
    mark_loss = ref.binary_cross_entropy(marks, np.ones_like(marks), reduction="none")
    mark_x, mark_y = _svg_xy(marks, mark_loss, y_max)
    step_x, step_y = _svg_xy(steps, loss_at, y_max)
    data = {
        "p": [f"{p:.2f}" for p in steps],
        "loss": [f"{abs(v):.2f}" for v in loss_at],  # abs: -log(1) is -0.0
        "x": [round(float(v), 1) for v in step_x],
        "y": [round(float(v), 1) for v in step_y],
    }
    start = 59  # p = 0.60
    i = html.escape(element_id)

    style = f"""<style>
#{i} {{ --w-fg: var(--pst-color-text-base, #222); --w-bg: var(--pst-color-surface, #fff);
  --w-curve: #1f5fa8; --w-mark: #e07b00; --w-marker: #b8322a; --w-guide: #7f7f7f;
  background: var(--w-bg); color: var(--w-fg); padding: 0.5em; max-width: 680px; }}
html[data-theme="dark"] #{i} {{ --w-curve: #7fb2ff; --w-mark: #ffad4d; --w-marker: #ff7a70; --w-guide: #a0a0a0; }}
#{i} svg {{ font: 13px sans-serif; fill: currentColor; }}
#{i} svg line.axis {{ stroke: currentColor; }}
#{i} input[type=range] {{ width: 100%; height: 32px; margin: 0; accent-color: var(--w-curve); }}
#{i} figcaption {{ color: var(--w-fg); }}
@media (max-width: 600px) {{ #{i} svg {{ font-size: 22px; }} }}
</style>"""
    ticks = []
    for t in np.arange(0, 1.01, 0.2):
        x, _ = _svg_xy(np.array(t), np.array(0.0), y_max)
        ticks.append(f'<line x1="{x:.1f}" y1="320" x2="{x:.1f}" y2="326" class="axis"/>'
                     f'<text x="{x:.1f}" y="342" text-anchor="middle">{t:.1f}</text>')
    for t in range(0, 6):
        _, y = _svg_xy(np.array(0.0), np.array(float(t)), y_max)
        ticks.append(f'<line x1="54" y1="{y:.1f}" x2="60" y2="{y:.1f}" class="axis"/>'
                     f'<text x="48" y="{y + 4:.1f}" text-anchor="end">{t}</text>')
    labels = []
    for p, v, x, y in zip(marks, mark_loss, mark_x, mark_y):
        anchor, dx = ("end", -8) if p > 0.5 else ("start", 8)
        labels.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" style="fill: var(--w-mark)"/>'
                      f'<text x="{x + dx:.1f}" y="{y - 8:.1f}" text-anchor="{anchor}">p = {p:g}: {v:.2f}</text>')

    return f"""<figure class="celib-widget" id="{i}">
{style}
<svg viewBox="0 0 640 380" width="100%" role="img" aria-label="Loss minus log p of the true class against the predicted probability p; the loss grows without bound as p goes to 0">
<line class="axis" x1="60" y1="320" x2="620" y2="320"/><line class="axis" x1="60" y1="20" x2="60" y2="320"/>
{''.join(ticks)}
<text x="340" y="372" text-anchor="middle">predicted probability p of the true class</text>
<text x="16" y="170" text-anchor="middle" transform="rotate(-90 16 170)">loss −log p (nats)</text>
<path d="{path}" fill="none" style="stroke: var(--w-curve)" stroke-width="2.5"/>
{''.join(labels)}
<line class="guide" x1="{data['x'][start]}" y1="320" x2="{data['x'][start]}" y2="{data['y'][start]}" style="stroke: var(--w-guide)" stroke-dasharray="4 3"/>
<circle class="marker" cx="{data['x'][start]}" cy="{data['y'][start]}" r="7" fill="none" style="stroke: var(--w-marker)" stroke-width="3"/>
</svg>
<div style="margin:0.3em 0">
<label for="{i}-slider">Move the prediction from confident and wrong (left) to confident and right (right):</label><br/>
<input type="range" id="{i}-slider" class="slider" min="0" max="99" step="1" value="{start}" aria-label="predicted probability of the true class"/>
</div>
<p style="margin:0">p = <output class="p-value">{data['p'][start]}</output>, loss = <output class="loss-value">{data['loss'][start]}</output> nats</p>
<figcaption>The penalty of confidence: the cross-entropy loss of one example is −log p, where p is the probability the model gives the true class. Marked: p = 0.99, 0.6, 0.1 and 0.01.</figcaption>
<script>
(function () {{
  var root = document.getElementById({json.dumps(element_id)});
  var d = {json.dumps(data)};
  var slider = root.querySelector(".slider"), marker = root.querySelector(".marker"), guide = root.querySelector(".guide");
  function show(k) {{
    marker.setAttribute("cx", d.x[k]); marker.setAttribute("cy", d.y[k]);
    guide.setAttribute("x1", d.x[k]); guide.setAttribute("x2", d.x[k]); guide.setAttribute("y2", d.y[k]);
    root.querySelector(".p-value").textContent = d.p[k];
    root.querySelector(".loss-value").textContent = d.loss[k];
  }}
  slider.addEventListener("input", function () {{ show(parseInt(slider.value, 10)); }});
}})();
</script>
</figure>"""
