// A small persistent thread pool for the CPU drivers. Work is handed out as
// item indices through an atomic counter, so which thread runs an item never
// changes a result: every item writes its own outputs.
#pragma once
#include <cstdint>
#include <functional>

namespace fusedopt::cpu {

int num_threads();
void set_num_threads(int n);  // n <= 0: all hardware threads

// Runs fn(i) for every i in [0, n) on the pool and the calling thread; returns
// when all are done.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

}  // namespace fusedopt::cpu
