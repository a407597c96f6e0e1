"""Triton device code: one Adam/AdamW update over a flat buffer cut into chunks.

Only ``triton`` is imported here, so the kernel can be compiled ahead of time for a GPU
target on a machine without one (``tests/test_kernel_compiles.py`` does so, through the
package, which imports torch too).
The host-side launcher that validates inputs and picks the variant lives in ``adam.py``.

Layout contract (built by the host):

* ``param``, ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq`` are flat buffers with one
  common element index. A *segment* is the element range of one tensor; every segment
  starts at a multiple of 16 elements and 16 bytes.
* A *chunk* is a slice of one segment; each program updates one chunk. The chunk table is
  ``int64[n_chunks, 5]``: first element, end element (exclusive), segment, hyperparameter
  row, step counter. Chunk starts are multiples of 16 elements.
* ``grad_shift[segment]`` says where the segment's gradient lives: the gradient of flat
  element ``i`` is ``grad_base[i + grad_shift[segment]]``. ``NO_GRADIENT`` (-1, never a valid
  shift because valid shifts are multiples of ``VEC`` >= 2) means the segment has no gradient:
  it is neither updated nor counted. Valid shifts keep 16-byte alignment.
* ``steps[counter]`` holds the number of completed steps of the chunk's segment (float32,
  as torch keeps ``state["step"]``). With ``BUMP_STEPS`` each chunk owns its counter, reads
  it and writes it back incremented (after a barrier: every warp has read it by then), so
  no two programs touch the same counter and one launch does the whole step. Without it every program reads ``steps[0]`` and nothing is
  written (the caller increments).
* ``hyper[row]`` is ``float64[5]``: lr, beta1, beta2, eps, weight_decay.
* ``param_shift[segment]`` says where the segment's model parameter lives, as
  ``grad_shift`` does for its gradient: 0 for a segment in the flat buffer, another
  tensor's offset for a parameter a wrapper keeps elsewhere (a DTensor's local shard, a
  bucket). It moves the parameter pointer (the copy's, with master weights; the masters and
  the moments are always in their flat buffers). Shifts are multiples of ``VEC``.
"""

import triton
import triton.language as tl

NO_GRADIENT = tl.constexpr(-1)
CHUNK_TABLE_COLUMNS = tl.constexpr(5)
HYPER_TABLE_COLUMNS = tl.constexpr(5)


@triton.jit
def _div(numerator, denominator, COMPUTE_DTYPE: tl.constexpr):
    # torch divides with IEEE rounding; Triton's plain fp32 `/` is an approximation.
    if COMPUTE_DTYPE == tl.float64:
        return numerator / denominator
    else:
        return tl.div_rn(numerator, denominator)


@triton.jit
def _sqrt(x, COMPUTE_DTYPE: tl.constexpr):
    if COMPUTE_DTYPE == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _load(pointers, mask, COMPUTE_DTYPE: tl.constexpr):
    if mask is None:
        values = tl.load(pointers)
    else:
        values = tl.load(pointers, mask=mask, other=0.0)
    if values.dtype == tl.bfloat16:
        # Widened on the bits, exact on every backend: triton's interpreter mangles bfloat16
        # subnormals on this conversion, so tests on CPU would read values the GPU does not.
        values = (values.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return values.to(COMPUTE_DTYPE)


# Past this exponent 1 - beta**t rounds to 1 for every beta < 1 (beta**t < 2**-54), so
# larger step counts can be clamped to it before they become an int64.
_LARGEST_EXPONENT = tl.constexpr(2.0**62)


@triton.jit
def _powers(beta1, beta2, step):
    """beta1**step and beta2**step in float64, as torch's pow(beta, step) up to rounding.

    The whole part by repeated squaring: plain multiplications compile on every backend and
    in the interpreter (which has no libdevice pow), and float64 keeps 1 - beta**t free of
    the cancellation that float32 would suffer at small t. torch's counts are whole; a
    fractional one (a hand-edited checkpoint) gets its fraction through exp and log.
    """
    exponent = tl.minimum(step.to(tl.float64), _LARGEST_EXPONENT)
    remaining = exponent.to(tl.int64)
    fraction = exponent - remaining.to(tl.float64)
    # beta == 0: 0**whole is 0 already (step >= 1), and log(0) is left alone.
    power1 = tl.exp(fraction * tl.log(tl.where(beta1 > 0.0, beta1, 1.0)))
    power2 = tl.exp(fraction * tl.log(tl.where(beta2 > 0.0, beta2, 1.0)))
    base1 = beta1
    base2 = beta2
    while remaining > 0:
        odd = (remaining & 1) == 1
        power1 = tl.where(odd, power1 * base1, power1)
        power2 = tl.where(odd, power2 * base2, power2)
        base1 = base1 * base1
        base2 = base2 * base2
        remaining = remaining >> 1
    # A NaN count (only the functional form can be handed one) gives NaN, as torch's pow;
    # tl.minimum above may have made it a number.
    counted = step.to(tl.float64) == step.to(tl.float64)
    power1 = tl.where(counted, power1, step.to(tl.float64))
    power2 = tl.where(counted, power2, step.to(tl.float64))
    return power1, power2


@triton.jit
def _round_to_bfloat16(values):
    """float32 -> bfloat16, to nearest, ties to even, on the bits.

    The same on every backend: triton's interpreter truncates (and flushes subnormals) on
    this conversion, so tests on CPU would otherwise check a rounding the GPU does not do.
    """
    bits = values.to(tl.uint32, bitcast=True)
    # A nan's payload could carry into the sign bit: keep nans' top bits as they are.
    bits = tl.where(values != values, bits, bits + (0x7FFF + ((bits >> 16) & 1)))
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _to_storage(values, pointer):
    """Round float32/float64 results to the dtype stored behind ``pointer``, to nearest."""
    if pointer.dtype.element_ty == tl.bfloat16:
        return _round_to_bfloat16(values.to(tl.float32))
    else:
        return values.to(pointer.dtype.element_ty)


@triton.jit
def _round_stochastically_to_bfloat16(values, random_bits):
    """float32 -> bfloat16, rounding up with probability equal to the distance to the lower
    neighbour: add 16 random bits below bfloat16's last place, then truncate them."""
    bits = values.to(tl.uint32, bitcast=True)
    # A nan's payload could carry into the sign bit: keep nans' top bits as they are.
    bits = tl.where(values != values, bits, bits + (random_bits & 0xFFFF))
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _store(pointers, values, mask, random_bits, STOCHASTIC_ROUNDING: tl.constexpr):
    """Store float32/float64 results in the dtype behind ``pointers``: bfloat16 at random with
    stochastic rounding, else to nearest."""
    if STOCHASTIC_ROUNDING and pointers.dtype.element_ty == tl.bfloat16:
        # As _to_storage: float64 results (float64 parameters, bfloat16 states) go through
        # float32, whose 16 bits below bfloat16's last place are as many as the random bits.
        tl.store(pointers, _round_stochastically_to_bfloat16(values.to(tl.float32), random_bits), mask=mask)
    else:
        tl.store(pointers, _to_storage(values, pointers), mask=mask)


@triton.jit
def _adam_tile(
    offsets,
    mask,
    grad_shift,
    param_ptr,
    param_copy_ptr,
    grad_base_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    grad_scale,
    random_key,
    step_size,
    bias_correction2_sqrt,
    lerp_weight,
    one_minus_lerp_weight,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    decay_factor,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECOUPLED_WEIGHT_DECAY: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    WRITE_PARAM_COPY: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr,
):
    grad_ptrs = grad_base_ptr + (offsets + grad_shift)
    grad = _load(grad_ptrs, mask, COMPUTE_DTYPE)
    param = _load(param_ptr + offsets, mask, COMPUTE_DTYPE)
    exp_avg = _load(exp_avg_ptr + offsets, mask, COMPUTE_DTYPE)
    exp_avg_sq = _load(exp_avg_sq_ptr + offsets, mask, COMPUTE_DTYPE)

    if HAS_GRAD_SCALE:
        # GradScaler's contract with fused optimizers: unscale here, and leave the unscaled
        # gradient behind as torch's fused kernel and GradScaler.unscale_ do.
        grad = _div(grad, grad_scale, COMPUTE_DTYPE)
        tl.store(grad_ptrs, _to_storage(grad, grad_base_ptr), mask=mask)
    if MAXIMIZE:
        grad = -grad
    if DECOUPLED_WEIGHT_DECAY:
        param = param * decay_factor
    else:
        # torch skips the L2 term when weight_decay == 0, which keeps inf parameters from
        # turning the gradient into nan (0 * inf). One fused multiply-add, as torch's fused
        # kernels compile it: where the gradient all but cancels the decay, a rounded product
        # leaves 0 where torch keeps a residue, and eps makes that ulp a visible update.
        grad = tl.where(weight_decay != 0.0, tl.fma(weight_decay, param, grad), grad)

    # torch's lerp: the branch keeps the rounding of the shorter interpolation.
    delta = grad - exp_avg
    exp_avg = tl.where(
        lerp_weight < 0.5,
        exp_avg + lerp_weight * delta,
        grad - delta * one_minus_lerp_weight,
    )
    exp_avg_sq = exp_avg_sq * beta2
    exp_avg_sq = exp_avg_sq + (one_minus_beta2 * grad) * grad

    if STOCHASTIC_ROUNDING:
        # Independent streams for the parameter and each moment (one Philox call gives all
        # four; the parameter's is tl.randint's). 32-bit counters: offsets wrap past 2**32
        # elements, harmlessly; the 64-bit variant costs several times the integer work.
        param_bits, exp_avg_bits, exp_avg_sq_bits, _ = tl.randint4x(random_key, offsets.to(tl.int32))
    else:
        param_bits, exp_avg_bits, exp_avg_sq_bits = None, None, None

    second_moment = exp_avg_sq
    if AMSGRAD:
        max_exp_avg_sq = _load(max_exp_avg_sq_ptr + offsets, mask, COMPUTE_DTYPE)
        max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL)
        # exp_avg_sq's bits: where the maximum is this step's exp_avg_sq, both round alike,
        # so the stored maximum is never below the stored exp_avg_sq.
        _store(max_exp_avg_sq_ptr + offsets, max_exp_avg_sq, mask, exp_avg_sq_bits, STOCHASTIC_ROUNDING)
        second_moment = max_exp_avg_sq

    denom = _div(_sqrt(second_moment, COMPUTE_DTYPE), bias_correction2_sqrt, COMPUTE_DTYPE) + eps
    # torch's order, step_size * m / denom: the product first (it can overflow where the
    # quotient first would not).
    param = param - _div(step_size * exp_avg, denom, COMPUTE_DTYPE)

    _store(param_ptr + offsets, param, mask, param_bits, STOCHASTIC_ROUNDING)
    if WRITE_PARAM_COPY:
        # Master weights: the model's low-precision parameter is the master rounded to nearest.
        tl.store(param_copy_ptr + offsets, _to_storage(param, param_copy_ptr), mask=mask)
    # bfloat16 moments rounded at random too: to nearest, a step's decay of exp_avg_sq at
    # beta2 = 0.999 is under half a unit and rounds away, so it would only ever grow.
    _store(exp_avg_ptr + offsets, exp_avg, mask, exp_avg_bits, STOCHASTIC_ROUNDING)
    _store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask, exp_avg_sq_bits, STOCHASTIC_ROUNDING)


@triton.jit
def _adam_chunk_kernel(
    param_ptr,
    param_copy_ptr,
    grad_base_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    grad_shift_ptr,
    param_shift_ptr,
    chunk_ptr,
    step_ptr,
    hyper_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    random_seed,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECOUPLED_WEIGHT_DECAY: tl.constexpr,
    BUMP_STEPS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    WRITE_PARAM_COPY: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    chunk_row = chunk_ptr + chunk * CHUNK_TABLE_COLUMNS
    start = tl.load(chunk_row)
    end = tl.load(chunk_row + 1)
    segment = tl.load(chunk_row + 2)
    hyper_row = hyper_ptr + tl.load(chunk_row + 3) * HYPER_TABLE_COLUMNS

    grad_shift = tl.load(grad_shift_ptr + segment)
    update = grad_shift != NO_GRADIENT
    param_shift = tl.multiple_of(tl.load(param_shift_ptr + segment), VEC)
    if WRITE_PARAM_COPY:
        param_copy_ptr = param_copy_ptr + param_shift
    else:
        param_ptr = param_ptr + param_shift
    if HAS_FOUND_INF:
        # GradScaler saw an inf or nan: the whole step is skipped, counters included.
        update = update & (tl.load(found_inf_ptr) == 0.0)
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(COMPUTE_DTYPE)

    if BUMP_STEPS:
        counter_ptr = step_ptr + tl.load(chunk_row + 4)
    else:
        counter_ptr = step_ptr
    completed = tl.load(counter_ptr)
    # float32 addition, as torch's `step_t += 1`, so the counters saturate the same way.
    step = completed + 1.0

    lr = tl.load(hyper_row)
    beta1 = tl.load(hyper_row + 1)
    beta2 = tl.load(hyper_row + 2)
    eps = tl.load(hyper_row + 3)
    weight_decay = tl.load(hyper_row + 4)

    # Scalars in float64 and rounded once, as torch computes them with Python floats.
    beta1_power, beta2_power = _powers(beta1, beta2, step)
    step_size = (lr / (1.0 - beta1_power)).to(COMPUTE_DTYPE)
    bias_correction2_sqrt = tl.sqrt(1.0 - beta2_power).to(COMPUTE_DTYPE)
    lerp_weight = (1.0 - beta1).to(COMPUTE_DTYPE)
    one_minus_lerp_weight = 1.0 - lerp_weight
    one_minus_beta2 = (1.0 - beta2).to(COMPUTE_DTYPE)
    # torch skips the decay when weight_decay == 0: an infinite lr must not make 1 - inf * 0.
    decay_factor = tl.where(weight_decay != 0.0, 1.0 - lr * weight_decay, 1.0).to(COMPUTE_DTYPE)
    # A new random stream every step, reproducible from the seed and the step count.
    random_key = random_seed + tl.minimum(step, _LARGEST_EXPONENT).to(tl.int64) * 0x9E3779B9

    # A chunk that is not updated runs no tile: nothing is read, written or counted.
    end = tl.where(update, end, start)
    start = tl.multiple_of(start, 16)
    grad_shift = tl.multiple_of(grad_shift, VEC)

    # Whole tiles carry no mask so that loads and stores stay 16-byte vectors; the ragged
    # end of the chunk gets one masked tile. (A while loop: triton 3.6's interpreter cannot
    # take a loaded value as a range() bound.)
    offset = start
    while offset + BLOCK <= end:
        offsets = tl.multiple_of(offset, 16) + tl.arange(0, BLOCK)
        _adam_tile(
            offsets, None, grad_shift,
            param_ptr, param_copy_ptr, grad_base_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
            grad_scale, random_key, step_size, bias_correction2_sqrt, lerp_weight, one_minus_lerp_weight,
            beta2.to(COMPUTE_DTYPE), one_minus_beta2, eps.to(COMPUTE_DTYPE),
            weight_decay.to(COMPUTE_DTYPE), decay_factor,
            AMSGRAD, MAXIMIZE, DECOUPLED_WEIGHT_DECAY, COMPUTE_DTYPE,
            HAS_GRAD_SCALE, WRITE_PARAM_COPY, STOCHASTIC_ROUNDING,
        )
        offset += BLOCK
    if offset < end:
        offsets = tl.multiple_of(offset, 16) + tl.arange(0, BLOCK)
        _adam_tile(
            offsets, offsets < end, grad_shift,
            param_ptr, param_copy_ptr, grad_base_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
            grad_scale, random_key, step_size, bias_correction2_sqrt, lerp_weight, one_minus_lerp_weight,
            beta2.to(COMPUTE_DTYPE), one_minus_beta2, eps.to(COMPUTE_DTYPE),
            weight_decay.to(COMPUTE_DTYPE), decay_factor,
            AMSGRAD, MAXIMIZE, DECOUPLED_WEIGHT_DECAY, COMPUTE_DTYPE,
            HAS_GRAD_SCALE, WRITE_PARAM_COPY, STOCHASTIC_ROUNDING,
        )

    if BUMP_STEPS:
        # Warps run their tiles unsynchronised: without a barrier a warp still to issue its
        # read of the counter could read the count this store has already advanced.
        tl.debug_barrier()
        tl.store(counter_ptr, step, mask=update)
