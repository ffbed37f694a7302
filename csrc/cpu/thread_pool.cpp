#include "thread_pool.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace fusedopt::cpu {
namespace {

struct Pool {
  std::mutex call_mu;  // one parallel_for at a time; other callers queue
  std::mutex mu;
  std::condition_variable wake, done;
  std::vector<std::thread> workers;
  int requested = 0;  // 0: hardware concurrency
  // The job in flight; workers pick it up when `generation` changes.
  uint64_t generation = 0;
  const std::function<void(int64_t)>* fn = nullptr;
  int64_t n = 0;
  std::atomic<int64_t> next{0};
  int active = 0;
  bool stopping = false;

  int target() const {
    int hw = static_cast<int>(std::thread::hardware_concurrency());
    return requested > 0 ? requested : (hw > 0 ? hw : 1);
  }

  void drain() {
    for (int64_t i; (i = next.fetch_add(1)) < n;) (*fn)(i);
  }

  // `seen` starts at the generation current when the worker is created: a
  // worker started by a resize must not mistake the last finished job for a new
  // one (it would decrement `active` once too often, and with two or more
  // workers run() could return while another worker still runs an item).
  void worker_loop(uint64_t seen) {
    std::unique_lock<std::mutex> lock(mu);
    while (true) {
      wake.wait(lock, [&] { return stopping || generation != seen; });
      if (stopping) return;
      seen = generation;
      lock.unlock();
      drain();
      lock.lock();
      if (--active == 0) done.notify_all();
    }
  }

  // Called with call_mu held and no job in flight.
  void resize_workers() {
    const size_t want = static_cast<size_t>(target() - 1);  // the caller works too
    if (workers.size() == want) return;
    {
      std::lock_guard<std::mutex> lock(mu);
      stopping = true;
    }
    wake.notify_all();
    for (auto& t : workers) t.join();
    workers.clear();
    stopping = false;
    const uint64_t start = generation;  // stable: only run() changes it, under call_mu
    for (size_t i = 0; i < want; ++i) workers.emplace_back([this, start] { worker_loop(start); });
  }

  void run(int64_t count, const std::function<void(int64_t)>& f) {
    std::lock_guard<std::mutex> guard(call_mu);
    resize_workers();
    {
      std::lock_guard<std::mutex> lock(mu);
      fn = &f;
      n = count;
      next.store(0);
      active = static_cast<int>(workers.size());
      ++generation;
    }
    wake.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mu);
    done.wait(lock, [&] { return active == 0; });
  }
};

std::atomic<Pool*> g_pool{nullptr};

Pool* pool() {
  Pool* p = g_pool.load();
  if (p) return p;
  static std::once_flag once;
  std::call_once(once, [] {
    g_pool.store(new Pool());
    // A forked child has none of the parent's threads (and maybe a mutex the
    // parent held): it gets a fresh pool. The old one is leaked on purpose.
    pthread_atfork(nullptr, nullptr, [] {
      Pool* fresh = new Pool();
      fresh->requested = g_pool.load()->requested;
      g_pool.store(fresh);
    });
  });
  return g_pool.load();
}

}  // namespace

int num_threads() { return pool()->target(); }

void set_num_threads(int n) {
  Pool* p = pool();
  std::lock_guard<std::mutex> guard(p->call_mu);
  p->requested = n > 0 ? n : 0;
}

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  Pool* p = pool();
  if (n == 1 || p->target() == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  p->run(n, fn);
}

}  // namespace fusedopt::cpu
