#include "chunk_table.h"

#include <stdexcept>

namespace fusedopt {

std::vector<LaunchPlan> build_chunk_table(const int64_t* numels, int64_t n, int64_t chunk,
                                          int max_rows, int max_blocks) {
  if (chunk <= 0 || max_rows <= 0 || max_blocks <= 0)
    throw std::invalid_argument("build_chunk_table: chunk, max_rows and max_blocks must be positive");
  std::vector<LaunchPlan> plans;
  LaunchPlan cur;
  auto flush = [&] {
    if (!cur.blocks.empty()) plans.push_back(std::move(cur));
    cur = LaunchPlan{};
  };
  for (int64_t t = 0; t < n; ++t) {
    if (numels[t] < 0) throw std::invalid_argument("build_chunk_table: negative size");
    const int64_t chunks = (numels[t] + chunk - 1) / chunk;
    if (chunks > INT32_MAX) throw std::invalid_argument("build_chunk_table: tensor too large for chunk size");
    for (int64_t c = 0; c < chunks;) {
      if (static_cast<int>(cur.rows.size()) == max_rows ||
          static_cast<int>(cur.blocks.size()) == max_blocks)
        flush();
      const int32_t local = static_cast<int32_t>(cur.rows.size());
      cur.rows.push_back(t);
      const int64_t room = max_blocks - static_cast<int64_t>(cur.blocks.size());
      const int64_t take = chunks - c < room ? chunks - c : room;
      for (int64_t k = 0; k < take; ++k)
        cur.blocks.push_back(BlockEntry{local, static_cast<int32_t>(c + k)});
      c += take;
      cur.row_is_last.push_back(c == chunks);
    }
  }
  flush();
  return plans;
}

}  // namespace fusedopt
