// The per-row exit rule of every policy: plain C++ shared by the CPU and the CUDA kernels.
//
// This is the C++ form of earlyexit_kernels/methods/exit_rules.py::exit_step (itself the
// executable form of docs/exit_methods.md). No torch headers here: the file
// is included by .cu files that must compile without the torch CUDA headers.
//
// Arithmetic follows the reference operation by operation in float32 (one rounding
// per PyTorch op, no fused multiply-add), so decisions match the reference except
// where a value lies within a few ulps of its threshold (the reference itself uses
// vectorised exp/log whose last bit can differ from libm's).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EEK_HD __host__ __device__ __forceinline__
#else
#define EEK_HD inline
#endif

namespace eek {

// Policy kinds and flags: earlyexit_kernels/backends/policy_lowering.py (PolicyKind, RuleFlag)
// holds the same values; python_tests/test_policy_lowering.py reads this file to check them.
enum Kind : int {
  kEntropy = 0,      // Entropy and SkipGates (the exit part)
  kMaxProb = 1,
  kPatience = 2,     // classification
  kPatienceReg = 3,  // regression (C == 1)
  kQExit = 4,
  kVoting = 5,
  kDact = 6,
  kScheduled = 7,
  kNumKinds = 8,
};

// Bits of RuleParams::flags.
enum Flag : int {
  kNormalized = 1,   // entropy divided by ln C
  kTemperature = 2,  // MaxProb divides the logits by the layer's temperature
  kStochastic = 4,   // QExit: exit with probability lambda (reads the uniforms)
  kSurvivors = 8,    // also produce the stable survivor list and its count
};

struct RuleParams {
  int kind;
  int flags;
  int layer;       // 1-based
  int num_layers;
  int num_labels;  // C
  int int_param;   // Patience: patience; Voting: min_votes
  float threshold;    // this layer's threshold (Entropy, MaxProb), as float32
  float temperature;  // this layer's temperature (MaxProb with kTemperature)
  float scalar;       // QExit: q; Patience regression: regression_threshold
  float log_c;        // float32(math.log(C)) for the normalized entropy
};

// Base pointers of the policy state (rows first, contiguous). Unused ones are null.
struct StateArgs {
  const int64_t* i64_in = nullptr;  // Patience: prev_pred; Scheduled: exit_layers
  int64_t* i64_out = nullptr;
  const int32_t* i32_in = nullptr;  // Patience: counter
  int32_t* i32_out = nullptr;
  const float* f0_in = nullptr;  // Patience regression: prev_value; QExit: cdf; DACT: pi
  float* f0_out = nullptr;
  const float* f1_in = nullptr;  // QExit: remaining
  float* f1_out = nullptr;
  const int32_t* vi_in = nullptr;  // Voting: votes [n, C]
  int32_t* vi_out = nullptr;
  const float* vf_in = nullptr;  // Voting: prob_sum; DACT: accumulated [n, C]
  float* vf_out = nullptr;
  const float* uniforms = nullptr;  // QExit stochastic: [n, L]
  int64_t uniforms_stride = 0;
};

// Optional write-back of the exiting rows to the batch outputs (engine._write_back).
// logits is null when there is no write-back.
enum OutDtype : int { kOutF32 = 0, kOutF16 = 1, kOutBF16 = 2 };
struct WriteBack {
  void* logits = nullptr;            // [B, C] in out_dtype, row stride logits_stride
  int out_dtype = kOutF32;
  int64_t logits_stride = 0;
  int64_t* exit_layer = nullptr;     // [B]
  int64_t* layers_run = nullptr;     // [B]
  const int64_t* rows = nullptr;     // [n] original position of each active row
  const int64_t* runs = nullptr;     // [n] layers run so far
  int64_t batch = 0;                 // B: a row index outside [0, B) is not written
};

#if defined(__CUDACC__)
EEK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
EEK_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
EEK_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
#else
// The CPU build compiles with -ffp-contract=off, so these are single roundings.
EEK_HD float mul_rn(float a, float b) { return a * b; }
EEK_HD float add_rn(float a, float b) { return a + b; }
EEK_HD float sub_rn(float a, float b) { return a - b; }
#endif

EEK_HD bool is_finite(float x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

EEK_HD float sigmoid(float x) { return 1.0f / add_rn(1.0f, ::expf(-x)); }

// Z is anything indexable as z[c] -> float: a float pointer, or a view that converts.

// Index of the first maximum of z[0..C) (torch.argmax on finite values).
template <typename Z>
EEK_HD int argmax_first(const Z& z, int C) {
  int best = 0;
  float value = z[0];
  for (int c = 1; c < C; ++c) {
    if (z[c] > value) {
      value = z[c];
      best = c;
    }
  }
  return best;
}

template <typename Z>
EEK_HD float max_of(const Z& z, int C) {
  float m = z[0];
  for (int c = 1; c < C; ++c) m = z[c] > m ? z[c] : m;
  return m;
}

// sum_c exp(z[c] - m).
template <typename Z>
EEK_HD float sum_exp_shifted(const Z& z, int C, float m) {
  float s = 0.0f;
  for (int c = 0; c < C; ++c) s = add_rn(s, ::expf(sub_rn(z[c], m)));
  return s;
}

// Shannon entropy (nats) of softmax(z), as exit_rules.entropy: via log_softmax.
template <typename Z>
EEK_HD float entropy_of(const Z& z, int C) {
  const float m = max_of(z, C);
  const float lse = ::logf(sum_exp_shifted(z, C, m));
  float acc = 0.0f;
  for (int c = 0; c < C; ++c) {
    const float log_p = sub_rn(sub_rn(z[c], m), lse);
    acc = add_rn(acc, mul_rn(::expf(log_p), log_p));
  }
  return -acc;
}

// (1 - pi) ** d as torch.pow(tensor, int scalar) computes it.
EEK_HD float pow_layers(float x, int d) {
  if (d == 0) return 1.0f;
  if (d == 1) return x;
  if (d == 2) return mul_rn(x, x);
  if (d == 3) return mul_rn(mul_rn(x, x), x);
  return ::powf(x, static_cast<float>(d));
}

// Apply the policy to one row. z: the row's C logits read as float32 (logits.float()),
// halting: the row's halting logit in float32 (NaN when the policy has none),
// returned: the row's C float32 outputs. Returns whether the row exits.
template <typename Z>
EEK_HD bool apply_rule(const RuleParams& p, const StateArgs& s, int64_t row, const Z& z, float halting,
                       float* returned) {
  const int C = p.num_labels;
  bool finite = true;
  for (int c = 0; c < C; ++c) finite = finite && is_finite(z[c]);
  bool exits = false;
  bool plain_return = true;

  switch (p.kind) {
    case kEntropy: {
      if (finite) {
        float h = entropy_of(z, C);
        if (p.flags & kNormalized) h = h / p.log_c;
        exits = h < p.threshold;
      }
      break;
    }
    case kMaxProb: {
      if (finite) {
        float m;
        float sum = 0.0f;
        if (p.flags & kTemperature) {
          m = z[0] / p.temperature;
          for (int c = 1; c < C; ++c) {
            const float v = z[c] / p.temperature;
            m = v > m ? v : m;
          }
          for (int c = 0; c < C; ++c) sum = add_rn(sum, ::expf(sub_rn(z[c] / p.temperature, m)));
        } else {
          m = max_of(z, C);
          sum = sum_exp_shifted(z, C, m);
        }
        const float max_p = 1.0f / sum;
        exits = max_p >= p.threshold;
      }
      break;
    }
    case kPatience: {
      const int64_t pred = finite ? static_cast<int64_t>(argmax_first(z, C)) : int64_t(-1);
      const bool agrees = finite && pred == s.i64_in[row];
      s.i64_out[row] = pred;
      const int32_t counter = agrees ? s.i32_in[row] + 1 : 0;
      s.i32_out[row] = counter;
      exits = counter == p.int_param;
      break;
    }
    case kPatienceReg: {
      const float value = z[0];
      const bool agrees = ::fabsf(sub_rn(value, s.f0_in[row])) < p.scalar;
      s.f0_out[row] = value;
      const int32_t counter = agrees ? s.i32_in[row] + 1 : 0;
      s.i32_out[row] = counter;
      exits = counter == p.int_param;
      break;
    }
    case kQExit: {
      const bool valid = is_finite(halting);
      const float lam = valid ? sigmoid(halting) : 0.0f;
      const float remaining = s.f1_in[row];
      const float cdf = add_rn(s.f0_in[row], mul_rn(lam, remaining));
      s.f0_out[row] = cdf;
      s.f1_out[row] = mul_rn(remaining, sub_rn(1.0f, lam));
      if (p.flags & kStochastic) {
        exits = valid && finite && s.uniforms[row * s.uniforms_stride + (p.layer - 1)] < lam;
      } else {
        exits = valid && finite && cdf > p.scalar;
      }
      break;
    }
    case kVoting: {
      const int32_t* votes_in = s.vi_in + row * C;
      int32_t* votes = s.vi_out + row * C;
      const float* sum_in = s.vf_in + row * C;
      float* prob_sum = s.vf_out + row * C;
      int pred = -1;
      float m = 0.0f, inv = 0.0f;
      if (finite) {
        pred = argmax_first(z, C);
        m = max_of(z, C);
        inv = 1.0f / sum_exp_shifted(z, C, m);
      }
      int32_t most = 0;
      const float div = static_cast<float>(p.layer + 1);
      float total = 0.0f;
      for (int c = 0; c < C; ++c) {
        const int32_t v = votes_in[c] + (c == pred ? 1 : 0);
        const float prob = finite ? mul_rn(::expf(sub_rn(z[c], m)), inv) : 0.0f;
        const float ps = add_rn(sum_in[c], prob);
        votes[c] = v;
        prob_sum[c] = ps;
        most = (c == 0 || v > most) ? v : most;
        total = add_rn(total, add_rn(static_cast<float>(v), ps / div));
      }
      const float log_total = ::logf(total);
      for (int c = 0; c < C; ++c) {
        const float score = add_rn(static_cast<float>(votes[c]), prob_sum[c] / div);
        returned[c] = sub_rn(::logf(score), log_total);
      }
      plain_return = false;
      exits = finite && most >= p.int_param;
      break;
    }
    case kDact: {
      const bool valid = finite && is_finite(halting);
      const float pi_prev = s.f0_in[row];
      const float* acc_in = s.vf_in + row * C;
      float* acc = s.vf_out + row * C;
      float pi = pi_prev;
      if (valid) {
        const float m = max_of(z, C);
        const float inv = 1.0f / sum_exp_shifted(z, C, m);
        const float keep = sub_rn(1.0f, pi_prev);
        for (int c = 0; c < C; ++c) {
          const float prob = mul_rn(::expf(sub_rn(z[c], m)), inv);
          acc[c] = add_rn(mul_rn(pi_prev, prob), mul_rn(keep, acc_in[c]));
        }
        pi = mul_rn(sigmoid(halting), pi_prev);
      } else {
        for (int c = 0; c < C; ++c) acc[c] = acc_in[c];
      }
      s.f0_out[row] = pi;
      // Top two values (duplicates count twice), as topk(2).
      float first = acc[0] >= acc[1] ? acc[0] : acc[1];
      float second = acc[0] >= acc[1] ? acc[1] : acc[0];
      for (int c = 2; c < C; ++c) {
        const float v = acc[c];
        if (v > first) {
          second = first;
          first = v;
        } else if (v > second) {
          second = v;
        }
      }
      const int left = p.num_layers - p.layer;
      const float margin =
          sub_rn(sub_rn(mul_rn(first, pow_layers(sub_rn(1.0f, pi), left)), second), mul_rn(static_cast<float>(left), pi));
      exits = valid && margin > 0.0f;
      for (int c = 0; c < C; ++c) returned[c] = ::logf(acc[c]);
      plain_return = false;
      break;
    }
    case kScheduled: {
      exits = s.i64_in[row] == static_cast<int64_t>(p.layer);
      break;
    }
    default:
      break;
  }
  if (plain_return) {
    for (int c = 0; c < C; ++c) returned[c] = z[c];
  }
  if (p.layer >= p.num_layers) exits = true;
  return exits;
}

}  // namespace eek
