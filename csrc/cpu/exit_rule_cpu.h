// The exit rule's per-row part on the CPU (exit_step_cpu.cpp), shared by the CPU ops that
// compute logits in blocks of rows and then apply the rule to them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "../common/exit_op.h"

namespace eek {

// The rule of `call` on rows r0 .. r0 + nb - 1 whose float32 logits are zf [nb, C]: each row's
// exit flag and returned logits, and for an exiting row the write-back to its batch position.
void rule_rows(ExitCall& call, int64_t C, int64_t r0, int64_t nb, const float* zf);

// After every row's rule: the stable survivor list (the staying rows first, in order) and their
// count where the call asked for them (kSurvivors), else the count -1.
void finish_survivors(ExitCall& call, int64_t n);

}  // namespace eek
