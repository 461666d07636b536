"""Point sampling for the mask losses and costs (PointRend / Mask2Former).

Design note. [ours, following Mask2Former]: mask costs are computed on K points drawn
uniformly and shared by all proposals and targets of an image; mask losses on K points per
supervised map chosen by importance sampling (draw oversample*K uniform points, keep the
importance_ratio*K most uncertain, fill up with fresh uniform points).

Conventions. Point coordinates are normalised (y, x) in [0, 1] over the padded image
(y first, like the project's boxes; detectron2 uses (x, y)). Predictions are sampled
bilinearly like detectron2's `point_sample` (grid_sample, align_corners=False, zero
padding: a point at normalised y lies at pixel coordinate y * h - 0.5). Targets are read
from the compact `segment_map` by nearest lookup (row floor(y * H)), so no full-resolution
per-segment mask is ever formed.
"""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp


def _unfused(arrays, source):
  """The uint32 arrays or float arrays in [0, 1], unchanged, computed once, not per use.

  Why: XLA fuses cheap elementwise producers into every consumer, recomputing them per
  consumed element; `lax.optimization_barrier` does not stop that on XLA:CPU (the pass
  that lowers it runs before fusion). An integer remainder by a value unknown at compile
  time counts as expensive, and XLA does not duplicate expensive producers into several
  consumers or into ones that reuse elements. Here the divisor `big` >= 2**31 is made
  from a bit of `source` at run time (so the compiler cannot fold it), an exact identity
  on the uint32 values below it: corner indices, and the bits of non-negative floats
  (a float division would not do: XLA rewrites x / scalar as x * (1 / scalar)).
  """
  bits = jax.lax.bitcast_convert_type(source.reshape(-1)[:1].astype(jnp.float32), jnp.uint32)[0]
  big = bits | jnp.uint32(0x80000000)

  def once(a):
    if a.dtype == jnp.uint32:
      return a % big
    as_bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.uint32) % big
    return jax.lax.bitcast_convert_type(as_bits, jnp.float32).astype(a.dtype)

  return tuple(once(a) for a in arrays)


def point_sample(maps: jax.Array, coords: jax.Array, unfused: bool = True) -> jax.Array:
  """Bilinear sample of maps at points, zero outside (grid_sample, align_corners=False).

  Args:
    maps: [N, h, w].
    coords: [P, 2] points shared by all maps, or [N, P, 2] per map; (y, x) in [0, 1]
      (any value works: outside, the zero padding as grid_sample's).
    unfused: compute the corners once (below); False when each point is sampled once.

  Returns:
    [N, P].

  How: the maps get a zero border (1 before, 2 after: every clipped corner lands in it)
  and are read as one flat vector at a scalar index per corner. Why: gathers with
  (map, y, x) index vectors made XLA:CPU build and store an int32 [..., P, 4] index array
  per corner (4 of them per importance sampling: a third of its time in the train step's
  profile) and scatter-add their gradients through 3-d indices; with flat indices the
  gradient of a [100, 12544]-point sample is ~1.6x faster (bench/points.py's maps).
  (Shared points read as row gathers of pixel-major maps, [h*w, N], were slower in the
  matching cost: the [P, N] -> [N, P] transposition went into each consumer.)
  The corner indices (uint32: no negative-index wrap-around) and weights are computed
  once (`_unfused`): XLA had fused their computation, and the uniform_points hash that
  made the points, into each corner's gather and the weighting, once per gathered value
  (for shared points: ~5 x N times per point; the [2, 100, 12544] gathers of the
  matching cost were ~9% of the train step's profile, issue 15).
  `unfused=False` skips that: for one consumer of the samples per point (the importance
  sampling's candidates, one uncertainty each), where nothing is recomputed and the
  three integer remainders per point that `_unfused` costs ran per element inside the
  candidates' gather fusion, the objective's largest op (README, issue 15).
  """
  n, h, w = maps.shape
  hp, wp = h + 3, w + 3
  padded = jnp.pad(maps, ((0, 0), (1, 2), (1, 2)))
  py = jnp.clip(coords[..., 0] * h - 0.5, -1.0, h)  # beyond: all four corners are zeros.
  px = jnp.clip(coords[..., 1] * w - 0.5, -1.0, w)
  y0 = jnp.floor(py)
  x0 = jnp.floor(px)
  wy1 = py - y0
  wx1 = px - x0
  base = ((y0.astype(jnp.int32) + 1) * wp + (x0.astype(jnp.int32) + 1)).astype(jnp.uint32)
  if unfused:
    base, wy1, wx1 = _unfused((base, wy1, wx1), coords)
  flat = padded.reshape(-1)
  if coords.ndim == 2:
    base, wy1, wx1 = base[None], wy1[None], wx1[None]
  idx = jnp.arange(n, dtype=jnp.uint32)[:, None] * jnp.uint32(hp * wp) + base
  take = lambda i: flat.at[i].get(mode="promise_in_bounds")
  top = take(idx) * (1.0 - wx1) + take(idx + 1) * wx1
  bottom = take(idx + wp) * (1.0 - wx1) + take(idx + wp + 1) * wx1
  return top * (1.0 - wy1) + bottom * wy1


def nearest_lookup(grid: jax.Array, coords: jax.Array) -> jax.Array:
  """Nearest-pixel lookup of an [H, W, ...] grid at [..., 2] normalised points."""
  h, w = grid.shape[:2]
  yi = jnp.clip(jnp.floor(coords[..., 0] * h).astype(jnp.int32), 0, h - 1)
  xi = jnp.clip(jnp.floor(coords[..., 1] * w).astype(jnp.int32), 0, w - 1)
  return grid[yi, xi]


def _mix32(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser (an avalanching bijection of uint32)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def uniform_points(rng: jax.Array, shape: tuple, offset=0) -> jax.Array:
  """Uniform normalised (y, x) points, [*shape, 2].

  Why not `jax.random.uniform`: on XLA:CPU threefry costs ~45 ns a number, and the
  losses draw ~8M numbers per image and decoder layer (3x oversampled candidates of 100
  maps): 0.36 s of a ~0.4 s importance sampling (bench/train_step.py profile). Here one
  threefry draw gives a 64-bit key and each number is a keyed hash of its counter
  (two rounds of murmur3's finaliser, 24-bit mantissa): ~8x faster, still a function of
  `rng` alone (reproducible, fold_in / split as usual).
  `offset` (an int, may be traced) starts the counter there: uniform_points(rng, (n, m),
  offset=r * m * 2) is row r.. of a larger draw uniform_points(rng, (N, m)) (the same
  values), so a draw can be made in pieces.
  """
  seed = jax.random.bits(rng, (2,), jnp.uint32)
  count = math.prod(shape) * 2
  counter = jax.lax.iota(jnp.uint32, count)
  if not (isinstance(offset, int) and offset == 0):
    counter = counter + jnp.asarray(offset).astype(jnp.uint32)
  h = counter * jnp.uint32(0x9E3779B9) + seed[0]
  h = _mix32(_mix32(h) ^ seed[1])
  u = (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
  return u.reshape(*shape, 2)


def _cumsum(x: jax.Array, block: int = 128) -> jax.Array:
  """Inclusive int32 cumsum over the last axis, blocked.

  Same values as `jnp.cumsum`, which XLA:CPU lowers to a reduce-window that took
  ~3x longer on the [B, 100, 37632] selections of the losses: log-depth scans inside
  blocks of `block`, then the (short) running sum of the block totals.
  """
  n = x.shape[-1]
  nb = -(-n // block)
  x = jnp.pad(x.astype(jnp.int32), [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)])
  x = x.reshape(*x.shape[:-1], nb, block)
  inner = jax.lax.associative_scan(jnp.add, x, axis=-1)
  offset = jnp.cumsum(inner[..., -1], -1) - inner[..., -1]
  return (inner + offset[..., None]).reshape(*x.shape[:-2], nb * block)[..., :n]


def _order_key(x: jax.Array) -> jax.Array:
  """int32 key with the same order as the float32 values (for integer bisection)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _kth_largest_key(key: jax.Array, k) -> jax.Array:
  """The k-th largest int32 key of each row, [..., n] -> [...], by 32 counting passes.

  `k` may be an int or an int array broadcastable to the rows.
  """
  lo = jnp.full(key.shape[:-1], jnp.iinfo(jnp.int32).min, jnp.int32)
  hi = jnp.full(key.shape[:-1], jnp.iinfo(jnp.int32).max, jnp.int32)

  def bisect(_, bounds):  # invariant: count(key >= lo) >= k > count(key >= hi).
    lo, hi = bounds
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
    ok = jnp.sum(key >= mid[..., None], -1) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  thr, _ = jax.lax.fori_loop(0, 32, bisect, (lo, hi))
  return thr


def _first_k(mask: jax.Array, k: int) -> jax.Array:
  """Positions of the first k True entries of each row of mask [..., n] -> [..., k] int32.

  Slot j of a row with fewer than k True entries holds j. Why a scatter of each selected
  position to its rank (running count - 1) rather than a binary search of ranks 1..k in
  the running count: the search is 16 dependent gathers of k entries per row, ~1.5x the
  time of the scatter on XLA:CPU (bench/loss.py).
  """
  n = mask.shape[-1]
  rank = _cumsum(mask) - 1
  target = jnp.where(mask & (rank < k), rank, k)  # k: out of bounds, dropped.
  source = jnp.arange(n, dtype=jnp.int32)
  init = jnp.arange(k, dtype=jnp.int32)
  place = lambda t: init.at[t].set(source, mode="drop")
  flat = target.reshape(-1, n)
  return jax.vmap(place)(flat).reshape(*mask.shape[:-1], k)


def top_k_indices(x: jax.Array, k: int) -> jax.Array:
  """Indices of the k largest entries of each row of x [..., n] -> [..., k] int32.

  The same set as `jax.lax.top_k(x, k)[1]` (ties: lowest index first), returned in
  increasing index order instead of by value. Why: XLA:CPU's top_k sorts; for the
  importance sampling (k = 9408 of n = 37632, 100 rows) that was 0.5 s per image and
  decoder layer. Here: the k-th largest value by bisection on the float's order-preserving
  int32 key (32 vectorised counting passes), then the selected positions scattered to
  their ranks (`_first_k`).
  """
  n = x.shape[-1]
  if k >= n:
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), x.shape)
  key = _order_key(x)
  thr = _kth_largest_key(key, k)
  above = key > thr[..., None]
  tie = key == thr[..., None]
  need = k - jnp.sum(above, -1, keepdims=True)
  chosen = above | (tie & (_cumsum(tie) <= need))  # exactly k per row.
  return _first_k(chosen, k)


def sampled_top_k_indices(x: jax.Array, k: int, sample: int = 4096) -> jax.Array:
  """About the k largest entries of each row of x [..., n], for i.i.d. rows -> [..., k].

  For rows whose entries are i.i.d. (the uncertainties of uniformly drawn candidate
  points): the threshold is the matching quantile of the first `sample` entries (a
  uniform subsample, since the order carries no information), found exactly there by
  `_kth_largest_key`; then the first k entries at or above it, in index order (a uniform
  subset of them). If fewer than k reach it, slot j >= count takes entry j (a uniform
  candidate: the same as the fresh random points the sampler adds anyway).
  Why: one counting pass over n instead of 32 (bisection on 4096 entries instead of
  37632): the objective's importance sampling was ~57% of the CPU train step (issue 15).
  How close: the threshold's rank has a standard error of n*sqrt(p(1-p)/sample)
  (p = k/n; 255 entries of 37632 at p = 1/4), so ~97% of the returned entries are among
  the exact top k (tests/test_points.py checks >= 90% and the margin).
  """
  n = x.shape[-1]
  if k >= n:
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), x.shape)
  m = min(sample, n)
  if m == n:
    return top_k_indices(x, k)
  key = _order_key(x)
  kk = max(1, min(m, round(k * m / n)))
  thr = _kth_largest_key(key[..., :m], kk)
  return _first_k(key >= thr[..., None], k)


# Selections of the importance sampling's most uncertain candidates: 'sampled' (default:
# sampled_top_k_indices, ~4x faster on a CPU) or 'exact' (top_k_indices, detectron2's set).
SELECTION = "sampled"
SELECT = {"sampled": sampled_top_k_indices, "exact": top_k_indices}
# Rows per while-loop iteration of importance_points(num_valid=...) and point_row_sums:
# the padding rows computed are < ROW_CHUNK per image. 4 rather than 8: the objective
# alone 0.89x CPU (2 cores, twice); 2: 1.15x (bench/loss.py --caps 50 --before REV).
ROW_CHUNK = 4


def logit_uncertainty(logits: jax.Array) -> jax.Array:
  """Mask2Former's calculate_uncertainty: -|logit| (highest at the decision boundary)."""
  return -jnp.abs(logits)


def prob_uncertainty(probs: jax.Array) -> jax.Array:
  """Same ranking as logit_uncertainty for maps given as probabilities."""
  return -jnp.abs(probs - 0.5)


def logit_or_prob_uncertainty(values: jax.Array, is_logit: jax.Array) -> jax.Array:
  """Per row: logit_uncertainty where is_logit [N], else prob_uncertainty of clip(p, 0, 1).

  For importance_points' `row_flags` (rows of logits and of merged probabilities).
  """
  return jnp.where(
    is_logit[:, None], logit_uncertainty(values), prob_uncertainty(jnp.clip(values, 0.0, 1.0))
  )


def _sample_rows(
  rng, maps, row0, num_points, oversample, importance_ratio, uncertainty_fn, row_flags, selection
):
  """importance_points of rows row0.. of the whole draw (maps: those rows)."""
  n = maps.shape[0]
  num_sampled = int(num_points * oversample)
  num_uncertain = int(importance_ratio * num_points)
  num_random = num_points - num_uncertain
  # One draw for candidates and fresh points (one PRNG kernel instead of two).
  per_row = num_sampled + num_random
  pts = uniform_points(rng, (n, per_row), offset=row0 * (per_row * 2))
  cand, fresh = pts[:, :num_sampled], pts[:, num_sampled:]
  if num_uncertain == 0:
    return fresh
  values = point_sample(maps, cand, unfused=False)
  unc = uncertainty_fn(values) if row_flags is None else uncertainty_fn(values, row_flags)
  idx = SELECT[selection](unc, num_uncertain)
  return jnp.concatenate([jnp.take_along_axis(cand, idx[..., None], axis=1), fresh], 1)


def importance_points(
  rng: jax.Array,
  maps: jax.Array,
  num_points: int,
  oversample: float = 3.0,
  importance_ratio: float = 0.75,
  uncertainty_fn: Callable[..., jax.Array] = logit_uncertainty,
  selection: str = "",
  row_flags=None,
  num_valid=None,
  chunk: int = ROW_CHUNK,
) -> jax.Array:
  """detectron2's get_uncertain_point_coords_with_randomness, per map.

  Args:
    rng: PRNG key.
    maps: [N, h, w] coarse predictions (logits, or probabilities with prob_uncertainty).
    num_points: K.
    oversample: draws int(K * oversample) candidates per map.
    importance_ratio: keeps int(K * ratio) most uncertain candidates.
    uncertainty_fn: elementwise uncertainty, higher = more uncertain; called as
      uncertainty_fn(values [n, C]) or, with row_flags, uncertainty_fn(values, flags [n])
      (e.g. logit_or_prob_uncertainty).
    selection: 'exact' | 'sampled' (see SELECT); '' = the module default SELECTION.
    row_flags: optional [N] per-row argument of uncertainty_fn.
    num_valid: optional int scalar (may be traced): only rows [0, num_valid) are
      needed. They are sampled `chunk` rows at a time in a while loop that stops after
      the last needed chunk, and get exactly the points they get without num_valid (the
      draw is indexed by row); rows from the first chunk past num_valid on are not
      sampled and hold (0.5, 0.5) points. Why: the losses' rows are padded to a static
      P (50 by default) and an image has ~20 targets; the candidates' sampling and
      selection were most of the objective's time on CPU (issue 15).
    chunk: rows per loop iteration when num_valid is given.

  Returns:
    [N, K, 2] normalised (y, x) points (no gradient flows through the choice).
  """
  maps = jax.lax.stop_gradient(maps)
  selection = selection or SELECTION
  if selection not in SELECT:
    raise ValueError(f"unknown selection {selection!r}; allowed: {', '.join(SELECT)}")
  sample = functools.partial(
    _sample_rows,
    rng,
    num_points=num_points,
    oversample=oversample,
    importance_ratio=importance_ratio,
    uncertainty_fn=uncertainty_fn,
    selection=selection,
  )
  if num_valid is None:
    return sample(maps, 0, row_flags=row_flags)
  n = maps.shape[0]
  chunk = max(1, min(chunk, n))
  count = num_chunks(num_valid, n, chunk)

  def body(carry):
    i, out = carry
    row0, _ = chunk_start(i, chunk, n)
    rows = jax.lax.dynamic_slice_in_dim(maps, row0, chunk)
    flags = None if row_flags is None else jax.lax.dynamic_slice_in_dim(row_flags, row0, chunk)
    pts = sample(rows, row0, row_flags=flags)
    return i + 1, jax.lax.dynamic_update_slice_in_dim(out, pts, row0, 0)

  out = jnp.full((n, num_points, 2), 0.5, jnp.float32)
  _, out = jax.lax.while_loop(lambda c: c[0] < count, body, (jnp.int32(0), out))
  return out


def num_needed(mask: jax.Array) -> jax.Array:
  """1 + the index of the last True entry of mask [..., n] (0 if none), int32 [...]."""
  ids = jnp.arange(1, mask.shape[-1] + 1, dtype=jnp.int32)
  return jnp.max(jnp.where(mask, ids, 0), -1)


def num_chunks(num_valid, n: int, chunk: int) -> jax.Array:
  """Chunks of `chunk` rows that cover rows [0, num_valid) of n (the last may overlap).

  The while loops over chunks of rows (or columns) here and in costs.mask_costs."""
  return jnp.minimum((jnp.asarray(num_valid, jnp.int32) + chunk - 1) // chunk, -(-n // chunk))


def chunk_start(i, chunk: int, n: int):
  """First row of chunk i, and which of its rows no earlier chunk had ([chunk] bool)."""
  row0 = jnp.minimum(i * chunk, n - chunk)  # the last chunk may overlap the one before.
  return row0, row0 + jnp.arange(chunk) >= i * chunk


def _slice_rows(tree, row0, chunk: int):
  return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, row0, chunk), tree)


def point_row_sums(fn, maps, coords, row_args, shared, num_valid, chunk: int = ROW_CHUNK):
  """Sums over rows [0, num_valid) of per-row terms of maps sampled at points.

  Args:
    fn: terms of a chunk of rows, fn(values [c, K], coords [c, K, 2], row_args of the c
      rows, shared) -> tuple of [c] per-row terms; a row's terms depend on its own values
      only, and are zero for rows it does not supervise (rows < num_valid may be).
    maps: [N, h, w] (the only differentiable input).
    coords: [N, K, 2] points of each row (point_sample's convention).
    row_args: pytree of [N, ...] arrays, sliced with the rows.
    shared: pytree passed whole to fn (the image's targets).
    num_valid: int scalar (may be traced); rows from the first chunk past it are skipped.
    chunk: rows per loop iteration.

  Returns:
    tuple of scalars: each term summed over the rows.

  Why: the losses' rows are padded to a static P (50 by default) and an image has ~20
  targets. Computed on all P rows, their point sampling, labels, terms and gradient
  scatters were half the objective's time on CPU (issue 15). A while loop skips the
  padding, and reverse-mode AD cannot go through a while loop, hence the custom VJP:
  the forward pass also takes each term's gradient w.r.t. the sampled values (cheap,
  elementwise), the backward pass combines them with the terms' cotangents and
  scatters them onto the maps (point_sample's transpose), chunk by chunk again.
  Both sample with `unfused=False`: a chunk's corner indices then cost no integer
  remainders, which were the loop's largest ops in the objective's profile (without
  them: 0.97x of the objective's CPU time, bench/loss.py --before 4041be3).
  """
  n, h, w = maps.shape
  chunk = max(1, min(chunk, n))
  count = num_chunks(num_valid, n, chunk)
  return _row_sums(fn, chunk, (h, w), maps, coords, row_args, shared, count)


def _row_sums_loop(fn, chunk, maps, coords, row_args, shared, num_chunks, with_grad):
  n = maps.shape[0]
  num_terms = len(
    jax.eval_shape(
      lambda v, c, a: fn(v, c, a, shared),
      jax.ShapeDtypeStruct((chunk, coords.shape[1]), maps.dtype),
      *_slice_rows((coords, row_args), 0, chunk),
    )
  )

  def body(carry):
    i, sums, grads = carry
    row0, fresh = chunk_start(i, chunk, n)
    pts, args = _slice_rows((coords, row_args), row0, chunk)
    values = point_sample(jax.lax.dynamic_slice_in_dim(maps, row0, chunk), pts, unfused=False)
    terms_of = lambda v: tuple(fn(v, pts, args, shared))
    if with_grad:
      terms, vjp = jax.vjp(terms_of, values)
      # Unmasked cotangents: a row's gradient is its own, so the overlapping last chunk
      # rewrites the same values.
      ones, zeros = jnp.ones((chunk,), values.dtype), jnp.zeros((chunk,), values.dtype)
      grads = tuple(
        jax.lax.dynamic_update_slice_in_dim(
          g, vjp(tuple(ones if j == t else zeros for j in range(num_terms)))[0], row0, 0
        )
        for t, g in enumerate(grads)
      )
    else:
      terms = terms_of(values)
    sums = tuple(s + jnp.sum(jnp.where(fresh, term, 0.0)) for s, term in zip(sums, terms))
    return i + 1, sums, grads

  sums = tuple(jnp.zeros((), maps.dtype) for _ in range(num_terms))
  zeros = jnp.zeros(coords.shape[:2], maps.dtype)
  grads = (zeros,) * num_terms if with_grad else ()
  _, sums, grads = jax.lax.while_loop(
    lambda c: c[0] < num_chunks, body, (jnp.int32(0), sums, grads)
  )
  return sums, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _row_sums(fn, chunk, hw, maps, coords, row_args, shared, num_chunks):
  del hw
  return _row_sums_loop(fn, chunk, maps, coords, row_args, shared, num_chunks, False)[0]


def _row_sums_fwd(fn, chunk, hw, maps, coords, row_args, shared, num_chunks):
  del hw
  sums, grads = _row_sums_loop(fn, chunk, maps, coords, row_args, shared, num_chunks, True)
  return sums, (coords, jnp.stack(grads), num_chunks)


def _row_sums_bwd(fn, chunk, hw, res, cotangents):
  del fn
  coords, grads, num_chunks = res  # grads: [terms, N, K], d term / d value per row.
  n = grads.shape[1]
  weights = jnp.stack(cotangents).astype(grads.dtype)

  def body(carry):
    i, dmaps = carry
    row0, _ = chunk_start(i, chunk, n)
    pts = jax.lax.dynamic_slice_in_dim(coords, row0, chunk)
    dvalues = jnp.einsum("t,tck->ck", weights, jax.lax.dynamic_slice_in_dim(grads, row0, chunk, 1))
    sample = functools.partial(point_sample, coords=pts, unfused=False)
    (drows,) = jax.linear_transpose(sample, jax.ShapeDtypeStruct((chunk, *hw), grads.dtype))(
      dvalues
    )
    return i + 1, jax.lax.dynamic_update_slice_in_dim(dmaps, drows, row0, 0)

  dmaps = jnp.zeros((n, *hw), grads.dtype)
  _, dmaps = jax.lax.while_loop(lambda c: c[0] < num_chunks, body, (jnp.int32(0), dmaps))
  return dmaps, None, None, None, None


_row_sums.defvjp(_row_sums_fwd, _row_sums_bwd)
