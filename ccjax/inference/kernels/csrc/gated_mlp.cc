// Block-gated MLP forward pass as one XLA FFI handler (float32, CPU).
//
// Same semantics as the XLA minibatch path of ccjax sparse inference (which, at batch 1,
// is also the batch-1 path): for every gated layer the policy runs on the layer's
// actual compact input, each example keeps its `k` most probable blocks with p > 0.5 (all
// `k` of them with the `exact_k` attribute: the `top_k` policy)
// (ties: lower block id), each block serves at most `C` examples (highest p first,
// ties: lower example), and for a layer with a gated input each weight tile (i, j)
// serves at most `C2` (example, input block, output block) triples in block j's
// example order; an (example, j) with an unserved triple is dropped whole. Only kept
// (example, block) pairs are computed, reading the block-major weight tiles in place.
// Batch 1 has its own path (no capacity can bind there): per layer the policy and the
// kept blocks or tiles as lists of small matrix-vector tasks (the next one prefetched),
// shared with one persistent helper thread when a core is idle (Batch1Helper).
//
// Buffers (all float32, row-major), with L hidden layers:
//   args: x [batch, in]; per layer l: kernel, bias [nb, bs], policy_kernel,
//         policy_bias [nb]; output_kernel [in_blocks, bs, classes], output_bias [classes].
//         Layer 0 (dense input): kernel [nb, in, bs], policy_kernel [in, nb].
//         Gated input: kernel [nb * in_blocks, bs, bs] (tile j * in_blocks + i),
//         policy_kernel [in_blocks, bs, nb].
//   rets: logits [batch, classes]; per layer: block_index s32 [batch, k],
//         kept pred [batch, k], counts s32 [2] = (candidates, kept), probs f32 [batch, nb].
//   attrs: example_capacity, block_capacity, pair_capacity (i64 [L]), policy_eps and
//          policy_scale (f32; p = eps + scale * sigmoid(logit)), num_threads (i64: most
//          threads, for loops large enough to pay: XLA's intra-op pool at batch > 1,
//          the calling thread and the batch-1 helper at batch 1).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "xla/ffi/api/ffi.h"

// setup.py compiles in the key of its build stamp (see ccjax/inference/kernels/build_stamp.py).
#ifndef CCJAX_BUILD_KEY
#define CCJAX_BUILD_KEY "none"
#endif

namespace ffi = xla::ffi;

namespace ccjax {
namespace {

// ---------------------------------------------------------------------- threads

// Parallel loops on XLA's intra-op thread pool (no thread start-up per call).
class Workers {
 public:
  Workers(ffi::ThreadPool pool, int64_t max_threads)
      : pool_(pool), max_threads_(std::max<int64_t>(1, max_threads)) {}

  // Calls fn(item) for every item in [0, n), handed out dynamically to the calling thread
  // and up to max_threads - 1 pool tasks. `work` (about the multiply-adds of the whole
  // loop) decides whether extra threads pay off. Pool tasks that start after the loop
  // is done return without touching it; the caller waits only for tasks that started.
  int64_t max_threads() const { return max_threads_; }

  template <typename Fn>
  void ParallelFor(int64_t n, int64_t work, const Fn& fn) {
    const int64_t helpers = std::min({max_threads_, n, work / kMinWorkPerThread}) - 1;
    std::atomic<int64_t> next{0};
    std::atomic<bool> failed{false};
    auto run = [&]() {
      for (int64_t item = next.fetch_add(1); item < n; item = next.fetch_add(1)) {
        try {
          fn(item);
        } catch (...) {
          failed = true;
        }
      }
    };
    if (helpers <= 0) {
      run();
    } else {
      struct State {
        std::mutex mutex;
        std::condition_variable idle;
        bool closed = false;
        int64_t running = 0;
      };
      auto state = std::make_shared<State>();
      for (int64_t t = 0; t < helpers; ++t) {
        try {
          pool_.Schedule([state, &run]() {
            {
              std::lock_guard<std::mutex> lock(state->mutex);
              if (state->closed) return;
              ++state->running;
            }
            run();
            std::lock_guard<std::mutex> lock(state->mutex);
            if (--state->running == 0) state->idle.notify_all();
          });
        } catch (...) {
          break;  // Fewer helpers; the calling thread still does all remaining items.
        }
      }
      run();
      std::unique_lock<std::mutex> lock(state->mutex);
      state->closed = true;
      state->idle.wait(lock, [&]() { return state->running == 0; });
    }
    if (failed) throw std::runtime_error("a parallel task failed");
  }

 private:
  // Below this many multiply-adds per thread (~10 us), a second thread costs more than
  // it saves.
  static constexpr int64_t kMinWorkPerThread = 1 << 17;

  ffi::ThreadPool pool_;
  int64_t max_threads_;
};

// ---------------------------------------------------------------------- products

constexpr int64_t kRowBlock = 4;   // rows sharing one pass over a tile
constexpr int64_t kPanel = 64;     // tile columns per pass (accumulators in registers)

// out[r][c] += sum_d in[r][d] * tile[d * stride + c] for r < kRows, c < kCols
// (compile-time sizes, so the accumulators live in registers).
template <int64_t kRows, int64_t kCols>
void PanelFixed(const float* const* in, float* const* out, const float* tile,
                int64_t depth, int64_t stride) {
  float acc[kRows][kCols] = {};
  for (int64_t d = 0; d < depth; ++d) {
    const float* w = tile + d * stride;
    for (int64_t r = 0; r < kRows; ++r) {
      const float a = in[r][d];
      for (int64_t c = 0; c < kCols; ++c) acc[r][c] += a * w[c];
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t c = 0; c < kCols; ++c) out[r][c] += acc[r][c];
  }
}

// The same with run-time sizes (rows <= kRowBlock, cols <= kPanel).
void PanelAny(const float* const* in, float* const* out, const float* tile, int64_t depth,
              int64_t stride, int64_t rows, int64_t cols) {
  float acc[kRowBlock][kPanel] = {};
  for (int64_t d = 0; d < depth; ++d) {
    const float* w = tile + d * stride;
    for (int64_t r = 0; r < rows; ++r) {
      const float a = in[r][d];
      for (int64_t c = 0; c < cols; ++c) acc[r][c] += a * w[c];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out[r][c] += acc[r][c];
  }
}

template <int64_t kCols>
void PanelRows(const float* const* in, float* const* out, const float* tile, int64_t depth,
               int64_t stride, int64_t rows) {
  switch (rows) {
    case 4: return PanelFixed<4, kCols>(in, out, tile, depth, stride);
    case 3: return PanelFixed<3, kCols>(in, out, tile, depth, stride);
    case 2: return PanelFixed<2, kCols>(in, out, tile, depth, stride);
    default: return PanelFixed<1, kCols>(in, out, tile, depth, stride);
  }
}

// out[r][:width] += in[r][:depth] @ tile for r < num_rows; tile is [depth, width]
// row-major. Reads the tile in place, kRowBlock rows per pass.
void AddRowsTimesTile(const float* const* in, float* const* out, int64_t num_rows,
                      const float* tile, int64_t depth, int64_t width) {
  float* shifted[kRowBlock];
  for (int64_t r0 = 0; r0 < num_rows; r0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, num_rows - r0);
    for (int64_t c0 = 0; c0 < width; c0 += kPanel) {
      const int64_t cols = std::min(kPanel, width - c0);
      for (int64_t r = 0; r < rows; ++r) shifted[r] = out[r0 + r] + c0;
      const float* panel = tile + c0;
      if (cols == 64) {
        PanelRows<64>(in + r0, shifted, panel, depth, width, rows);
      } else if (cols == 32) {
        PanelRows<32>(in + r0, shifted, panel, depth, width, rows);
      } else if (cols == 16) {
        PanelRows<16>(in + r0, shifted, panel, depth, width, rows);
      } else {
        PanelAny(in + r0, shifted, panel, depth, width, rows, cols);
      }
    }
  }
}

// Asks for `floats` floats from `data` on into the caches (L2 and up: a tile ahead of
// the reads is further than L1 should hold).
inline void Prefetch(const float* data, int64_t floats) {
  for (int64_t f = 0; f < floats; f += 64 / sizeof(float)) __builtin_prefetch(data + f, 0, 2);
}

// acc[:kCols] += in[d] * tile row d for d in [begin, end) (rows `stride` apart), also
// prefetching row d of `next` when kPrefetch.
template <int64_t kCols, bool kPrefetch>
void RowPanelRows(const float* in, const float* tile, int64_t begin, int64_t end,
                  int64_t stride, const float* next, float* acc) {
  for (int64_t d = begin; d < end; ++d) {
    const float* w = tile + d * stride;
    if (kPrefetch) Prefetch(next + d * stride, kCols);
    for (int64_t c = 0; c < kCols; ++c) acc[c] += in[d] * w[c];
  }
}

// out[:kCols] += in[:depth] @ tile[:, :kCols] for one row (tile rows `stride` apart).
// kChains partial sums over interleaved depths keep 64 multiply-adds in flight whatever
// the panel width. When `next` (a tile with the same row stride, read after this one) is
// given, its row d (for d < next_depth) is prefetched while row d is read: a whole tile
// ahead, where the hardware prefetcher, which stops at page boundaries, does not look.
template <int64_t kCols>
void RowPanel(const float* in, float* out, const float* tile, int64_t depth, int64_t stride,
              const float* next, int64_t next_depth) {
  constexpr int64_t kChains = kCols >= 64 ? 1 : 64 / kCols;
  float acc[kChains][kCols] = {};
  // Rows [0, ahead) also prefetch the next tile's row; whole groups of kChains rows first.
  const int64_t ahead = next == nullptr ? 0 : std::min(depth, next_depth);
  const int64_t grouped = depth / kChains * kChains;
  int64_t d = 0;
  for (; d + kChains <= std::min(ahead, grouped); d += kChains) {
    for (int64_t chain = 0; chain < kChains; ++chain) {
      const float* w = tile + (d + chain) * stride;
      Prefetch(next + (d + chain) * stride, kCols);
      const float a = in[d + chain];
      for (int64_t c = 0; c < kCols; ++c) acc[chain][c] += a * w[c];
    }
  }
  for (; d < grouped; d += kChains) {
    if (d < ahead) {  // the group that crosses `ahead`
      for (int64_t chain = 0; chain < kChains; ++chain) {
        if (d + chain < ahead) Prefetch(next + (d + chain) * stride, kCols);
      }
    }
    for (int64_t chain = 0; chain < kChains; ++chain) {
      const float* w = tile + (d + chain) * stride;
      const float a = in[d + chain];
      for (int64_t c = 0; c < kCols; ++c) acc[chain][c] += a * w[c];
    }
  }
  RowPanelRows<kCols, true>(in, tile, d, std::max(d, ahead), stride, next, acc[0]);
  RowPanelRows<kCols, false>(in, tile, std::max(d, ahead), depth, stride, nullptr, acc[0]);
  for (int64_t c = 0; c < kCols; ++c) {
    float sum = acc[0][c];
    for (int64_t chain = 1; chain < kChains; ++chain) sum += acc[chain][c];
    out[c] += sum;
  }
}

// out[:width] += in[:depth] @ tile for one row; tile is [depth, width] row-major. `next`
// (or nullptr) is a tile of `next_depth` rows of the same width to prefetch.
void RowTimesTile(const float* in, float* out, const float* tile, int64_t depth,
                  int64_t width, const float* next, int64_t next_depth) {
  for (int64_t c0 = 0; c0 < width; c0 += kPanel) {
    const int64_t cols = std::min(kPanel, width - c0);
    const float* ahead = next == nullptr ? nullptr : next + c0;
    if (cols == 64) {
      RowPanel<64>(in, out + c0, tile + c0, depth, width, ahead, next_depth);
    } else if (cols == 32) {
      RowPanel<32>(in, out + c0, tile + c0, depth, width, ahead, next_depth);
    } else if (cols == 16) {
      RowPanel<16>(in, out + c0, tile + c0, depth, width, ahead, next_depth);
    } else {
      float* shifted = out + c0;
      PanelAny(&in, &shifted, tile + c0, depth, width, 1, cols);
    }
  }
}

// ---------------------------------------------------------------------- batch-1 helper

// Batch 1 splits each layer's reads into small tasks (a row times a slice of a tile) that
// the calling thread and one persistent helper thread take from the two ends of the
// list. The helper spins for a short while after each job and then sleeps on a futex; the
// caller never waits for it to start: a helper that is asleep, descheduled or busy with
// another call leaves every task to the caller. Each task writes its own partial sum and
// the caller adds them in task order, so the result does not depend on who ran what.

// One task: in[:depth] @ tile[:depth, :width] (row stride `width`), added to its group's
// output.
struct Gemv {
  const float* in;
  const float* tile;
  int64_t depth;
  int64_t group;
};

// The matrix-vector tasks of one product, all of the same width, in groups: group g's
// tasks add up to its output row `out[g]` [width]. Run alone, each task adds into its
// group's row in task order; shared, each task writes its own partial sum and the
// caller adds the partial sums in task order: the same float operations either way
// (0 + s1 + s2 + ... for a group's task sums s1, s2, ...), so the same bits.
struct GemvJob {
  std::vector<Gemv> tasks;
  std::vector<float*> out;        // per group
  int64_t width = 0;
  int64_t stride = 0;             // floats between partial sums (width rounded up to 16)
  std::vector<float> partials;    // [tasks, stride] when shared
  int64_t bytes = 0;              // weight bytes the tasks read

  void Reset(int64_t new_width) {
    tasks.clear();
    out.clear();
    width = new_width;
    stride = (new_width + 15) / 16 * 16;
    bytes = 0;
  }
  // Adds in[:depth] @ tile to the current group, in tasks of about kTaskBytes of tile.
  void Add(const float* in, const float* tile, int64_t depth) {
    const int64_t rows = std::max<int64_t>(1, kTaskBytes / (4 * width));
    const int64_t group = static_cast<int64_t>(out.size());
    for (int64_t d = 0; d < depth; d += rows) {
      tasks.push_back({in + d, tile + d * width, std::min(rows, depth - d), group});
    }
    bytes += 4 * depth * width;
  }
  // Closes the current group; its tasks add up to `row` [width].
  void EndGroup(float* row) { out.push_back(row); }
  int64_t size() const { return static_cast<int64_t>(tasks.size()); }

  // Adds task t into `into` [width], prefetching task `next` (a guess at what this
  // thread runs next; none when out of range).
  void Run(int64_t t, int64_t next, float* into) const {
    const Gemv& task = tasks[t];
    const bool ahead = next >= 0 && next < size();
    RowTimesTile(task.in, into, task.tile, task.depth, width,
                 ahead ? tasks[next].tile : nullptr, ahead ? tasks[next].depth : 0);
  }
  // Task t into its own zeroed partial sum (shared jobs).
  void RunPartial(int64_t t, int64_t next) {
    float* partial = partials.data() + t * stride;
    std::fill(partial, partial + width, 0.0f);
    Run(t, next, partial);
  }
  void ZeroOutputs() {
    for (float* row : out) std::fill(row, row + width, 0.0f);
  }
  // Every task on the calling thread, in order, straight into the group rows.
  void RunAlone() {
    ZeroOutputs();
    for (int64_t t = 0; t < size(); ++t) Run(t, t + 1, out[tasks[t].group]);
  }
  // The group rows from the partial sums of a shared run, in task order.
  void AddPartials() {
    ZeroOutputs();
    for (int64_t t = 0; t < size(); ++t) {
      const float* partial = partials.data() + t * stride;
      float* row = out[tasks[t].group];
      for (int64_t c = 0; c < width; ++c) row[c] += partial[c];
    }
  }

  // About 16 KB of weights per task: a 64 x 64 float32 tile.
  static constexpr int64_t kTaskBytes = 16 << 10;
};

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

#if defined(__linux__)
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex word");
void FutexWait(std::atomic<uint32_t>& word, uint32_t value) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, value, nullptr,
          nullptr, 0);
}
void FutexWake(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, 1, nullptr,
          nullptr, 0);
}
#else
void FutexWait(std::atomic<uint32_t>&, uint32_t) {
  std::this_thread::sleep_for(std::chrono::microseconds(100));
}
void FutexWake(std::atomic<uint32_t>&) {}
#endif

// The process's one helper thread for batch-1 calls (started on first use, never
// stopped). One call at a time uses it; a concurrent call runs its tasks alone.
class Batch1Helper {
 public:
  // The helper, or nullptr when no thread could be started.
  static Batch1Helper* Get() {
    static Batch1Helper* helper = Start();
    return helper;
  }

  // Runs every task of `job` into its partial sums, with the helper taking tasks from
  // the back if it wakes up in time, and returns true when all are done; returns false,
  // having run nothing, when another call holds the helper.
  bool RunShared(GemvJob& job) {
    if (busy_.exchange(true, std::memory_order_acquire)) return false;
    job.partials.resize(job.size() * job.stride);
    const int64_t n = job.size();
    job_ = &job;
    claims_.store(0, std::memory_order_relaxed);
    const uint32_t epoch = ((word_.load(std::memory_order_relaxed) >> 2) + 1) & 0x3fffffffu;
    word_.store((epoch << 2) | kOpen, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst)) FutexWake(word_);
    if (test_join_wait_us_.load(std::memory_order_relaxed) > 0) WaitForJoin(epoch);
    for (;;) {  // the caller takes tasks from the front
      const uint64_t old = claims_.fetch_add(1, std::memory_order_relaxed);
      const int64_t front = static_cast<int64_t>(old & 0xffffffffu);
      if (front + static_cast<int64_t>(old >> 32) >= n) break;
      job.RunPartial(front, front + 1);
    }
    uint32_t open = (epoch << 2) | kOpen;
    if (word_.compare_exchange_strong(open, (epoch << 2) | kClosed,
                                      std::memory_order_acq_rel)) {
      solo_jobs_.fetch_add(1, std::memory_order_relaxed);
    } else {  // joined: wait for the task it is running (a few microseconds)
      if (finished_.load(std::memory_order_acquire) != epoch) {
        const auto start = std::chrono::steady_clock::now();
        for (int64_t spin = 0; finished_.load(std::memory_order_acquire) != epoch; ++spin) {
          if (spin < 4096) {
            CpuRelax();
          } else {
            std::this_thread::yield();
          }
        }
        if (std::chrono::steady_clock::now() - start > kStall) {
          Stalled();
        } else {
          backoff_.store(0, std::memory_order_relaxed);
        }
      }
      shared_jobs_.fetch_add(1, std::memory_order_relaxed);
    }
    busy_.store(false, std::memory_order_release);
    return true;
  }

  // Whether the next job may be offered to the helper: not for a while after the caller
  // waited long for it (a helper descheduled in the middle of a task, a busy machine).
  // Each stall in a row doubles the pause, up to kMaxBackoff jobs.
  // Nor while no core is idle (see CoreIdle).
  bool Offer() {
    if (test_join_wait_us_.load(std::memory_order_relaxed) > 0) return true;
    const int64_t skip = skip_.load(std::memory_order_relaxed);
    if (skip > 0) {
      skip_.store(skip - 1, std::memory_order_relaxed);  // racy by design: only a hint
      return false;
    }
    return CoreIdle();
  }

  // Test hooks: `join_wait_us` > 0 offers every job to the helper (whatever the backoff
  // and the load) and makes the caller wait up to that long for it to join before taking
  // tasks (so that a test sees both threads work); `pause` keeps the helper from joining
  // (the caller then runs every task after the wait: the fallback).
  void SetTestMode(bool pause, int64_t join_wait_us) {
    paused_.store(pause);
    test_join_wait_us_.store(join_wait_us);
  }
  // Jobs shared with the helper, jobs offered but run alone, tasks the helper ran,
  // stalls.
  void Stats(int64_t* out) const {
    out[0] = shared_jobs_.load();
    out[1] = solo_jobs_.load();
    out[2] = helper_tasks_.load();
    out[3] = stalls_.load();
  }

 private:
  static constexpr uint32_t kOpen = 1, kJoined = 2, kClosed = 3;  // low 2 bits of word_
  // How long the helper spins for the next job before it sleeps: covers the gaps between
  // the layers of a call (selection work) and back-to-back calls.
  static constexpr auto kSpin = std::chrono::microseconds(200);

  // A wait longer than this for the helper's last task counts as a stall.
  static constexpr auto kStall = std::chrono::microseconds(30);
  static constexpr int64_t kMinBackoff = 16, kMaxBackoff = 4096;
  static constexpr int64_t kLoadRefreshUs = 20000;

  // Whether some core is idle besides the caller's and a spinning helper's: the kernel's
  // count of runnable threads (/proc/loadavg), read at most every kLoadRefresh. On a
  // machine busy with other work the helper would mostly join late or be descheduled
  // mid-task, and its wake-ups and spinning take time from the caller and the others.
  bool CoreIdle() {
#if defined(__linux__)
    const int64_t now = std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
    if (now - load_read_us_.load(std::memory_order_relaxed) < kLoadRefreshUs) {
      return core_idle_.load(std::memory_order_relaxed);
    }
    load_read_us_.store(now, std::memory_order_relaxed);
    const int64_t runnable = RunnableThreads();
    if (runnable < 0) return true;  // unknown: share
    const int64_t ours = 1 + (sleeping_.load(std::memory_order_relaxed) ? 0 : 1);
    const bool idle = runnable - ours <= num_cores_ - 2;
    core_idle_.store(idle, std::memory_order_relaxed);
    return idle;
#else
    return true;
#endif
  }

  // The 4th field of /proc/loadavg, "runnable/total" threads: the runnable count, or -1.
  static int64_t RunnableThreads() {
#if defined(__linux__)
    const int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char text[128];
    const ssize_t size = read(fd, text, sizeof(text) - 1);
    close(fd);
    if (size <= 0) return -1;
    text[size] = '\0';
    const char* field = text;
    for (int spaces = 0; spaces < 3 && field != nullptr; ++spaces) {
      field = std::strchr(field, ' ');
      if (field != nullptr) ++field;
    }
    if (field == nullptr || *field < '0' || *field > '9') return -1;
    return std::strtol(field, nullptr, 10);
#else
    return -1;
#endif
  }

  void Stalled() {
    stalls_.fetch_add(1, std::memory_order_relaxed);
    const int64_t last = backoff_.load(std::memory_order_relaxed);
    const int64_t next = std::min(kMaxBackoff, last == 0 ? kMinBackoff : 2 * last);
    backoff_.store(next, std::memory_order_relaxed);
    skip_.store(next, std::memory_order_relaxed);
  }

  static Batch1Helper* Start() {
    auto* helper = new Batch1Helper();  // never deleted: the thread outlives every caller
    try {
      std::thread([helper]() { helper->Loop(); }).detach();
    } catch (...) {
      delete helper;
      return nullptr;
    }
    return helper;
  }

  void WaitForJoin(uint32_t epoch) {
    const auto until = std::chrono::steady_clock::now() +
                       std::chrono::microseconds(test_join_wait_us_.load());
    while (word_.load(std::memory_order_acquire) == ((epoch << 2) | kOpen) &&
           std::chrono::steady_clock::now() < until) {
      CpuRelax();
    }
  }

  void Loop() {
    uint32_t seen = word_.load(std::memory_order_acquire);
    for (;;) {
      uint32_t word = word_.load(std::memory_order_acquire);
      const auto spin_until = std::chrono::steady_clock::now() + kSpin;
      while (word == seen || (word & 3) != kOpen) {
        seen = word;
        if (std::chrono::steady_clock::now() < spin_until) {
          for (int i = 0; i < 64; ++i) CpuRelax();
        } else {
          sleeping_.store(true, std::memory_order_seq_cst);
          FutexWait(word_, word);
          sleeping_.store(false, std::memory_order_seq_cst);
        }
        word = word_.load(std::memory_order_acquire);
      }
      seen = word;
      if (paused_.load(std::memory_order_relaxed)) continue;
      if (!word_.compare_exchange_strong(word, (word & ~3u) | kJoined,
                                         std::memory_order_acq_rel)) {
        continue;  // the caller closed the job first
      }
      GemvJob& job = *job_;
      const int64_t n = job.size();
      int64_t ran = 0;
      for (;;) {  // the helper takes tasks from the back
        const uint64_t old = claims_.fetch_add(uint64_t{1} << 32, std::memory_order_relaxed);
        const int64_t back = static_cast<int64_t>(old >> 32);
        if (static_cast<int64_t>(old & 0xffffffffu) + back >= n) break;
        job.RunPartial(n - 1 - back, n - 2 - back);
        ++ran;
      }
      helper_tasks_.fetch_add(ran, std::memory_order_relaxed);
      finished_.store(word >> 2, std::memory_order_release);
    }
  }

  std::atomic<bool> busy_{false};      // a call owns the helper
  std::atomic<uint32_t> word_{0};      // (job epoch << 2) | state; the futex word
  std::atomic<uint32_t> finished_{0};  // epoch of the last job the helper finished
  std::atomic<bool> sleeping_{false};
  std::atomic<uint64_t> claims_{0};    // tasks taken: from the front (low 32 bits), back
  GemvJob* job_ = nullptr;
  std::atomic<bool> paused_{false};
  std::atomic<int64_t> test_join_wait_us_{0};
  const int64_t num_cores_ = std::max<int64_t>(1, std::thread::hardware_concurrency());
  std::atomic<int64_t> load_read_us_{-kLoadRefreshUs};  // when /proc/loadavg was read
  std::atomic<bool> core_idle_{true};
  std::atomic<int64_t> backoff_{0};  // the last pause after a stall (jobs), 0: none
  std::atomic<int64_t> skip_{0};     // jobs still to run alone
  std::atomic<int64_t> shared_jobs_{0}, solo_jobs_{0}, helper_tasks_{0}, stalls_{0};
};

// Below this many weight bytes a job stays on the calling thread: the hand-off costs a
// few microseconds (a futex wake-up when the helper sleeps), and 512 KB take about 13 us
// to read from cache (e.g. a decoding step's MLP, read every token), 30 - 50 us from DRAM.
constexpr int64_t kMinSharedBytes = 512 << 10;

// Runs a batch-1 job: on two threads when it reads enough bytes to pay for the hand-off
// and the call may use two, else on the calling thread.
void RunBatch1Job(GemvJob& job, int64_t max_threads) {
  Batch1Helper* helper = nullptr;
  if (max_threads >= 2 && job.size() >= 2 && job.bytes >= kMinSharedBytes) {
    helper = Batch1Helper::Get();
  }
  if (helper != nullptr && helper->Offer() && helper->RunShared(job)) {
    job.AddPartials();
  } else {
    job.RunAlone();
  }
}

// ---------------------------------------------------------------------- network

struct Layer {
  const float* kernel;
  const float* bias;
  const float* policy_kernel;
  const float* policy_bias;
  int64_t num_blocks;
  int64_t in_blocks;       // 0 when the input is dense (the first layer)
  int64_t example_capacity;
  int64_t block_capacity;
  int64_t pair_capacity;
};

// A layer's output in compact form: `slots` per example.
struct Compact {
  int64_t slots = 0;
  std::vector<int32_t> block;  // [batch, slots] block id (top-k order)
  std::vector<uint8_t> kept;   // [batch, slots]
  std::vector<float> hidden;   // [batch, slots, bs], zero where not kept
  int64_t num_kept = 0;
};

struct Shape {
  int64_t batch;
  int64_t input_dim;
  int64_t block_size;
};

// out[e, :width] += sum over kept slots s of h[e, s] @ blocks[block(e, s)], where
// blocks is [num_blocks, bs, width] (a gated-input policy or the output layer); each
// example's next kept block is prefetched while the current one is read.
void AddCompactTimesBlocks(const Compact& input, const float* blocks, int64_t width,
                           const Shape& shape, Workers& workers, float* out) {
  const int64_t bs = shape.block_size;
  workers.ParallelFor(shape.batch, input.num_kept * bs * width, [&](int64_t e) {
    const float* tile = nullptr;
    const float* h = nullptr;
    for (int64_t slot = e * input.slots; slot <= (e + 1) * input.slots; ++slot) {
      const bool last = slot == (e + 1) * input.slots;
      if (!last && !input.kept[slot]) continue;
      const float* next = last ? nullptr : blocks + input.block[slot] * bs * width;
      if (tile != nullptr) RowTimesTile(h, out + e * width, tile, bs, width, next, bs);
      tile = next;
      if (!last) h = input.hidden.data() + slot * bs;
    }
  });
}

// Policy logits [batch, nb] of `layer` on its input (x or the previous compact output),
// written to `logits`.
void PolicyLogits(const Layer& layer, const float* x, const Compact* input,
                  const Shape& shape, Workers& workers, std::vector<float>& logits) {
  const int64_t nb = layer.num_blocks;
  logits.assign(shape.batch * nb, 0.0f);
  if (input != nullptr) {
    AddCompactTimesBlocks(*input, layer.policy_kernel, nb, shape, workers, logits.data());
  } else if (shape.batch == 1) {
    RowTimesTile(x, logits.data(), layer.policy_kernel, shape.input_dim, nb, nullptr, 0);
  } else {
    const int64_t chunks = (shape.batch + kRowBlock - 1) / kRowBlock;
    const int64_t work = shape.batch * shape.input_dim * nb;
    workers.ParallelFor(chunks, work, [&](int64_t chunk) {
      const float* rows[kRowBlock];
      float* outs[kRowBlock];
      const int64_t first = chunk * kRowBlock;
      const int64_t count = std::min(kRowBlock, shape.batch - first);
      for (int64_t r = 0; r < count; ++r) {
        rows[r] = x + (first + r) * shape.input_dim;
        outs[r] = logits.data() + (first + r) * nb;
      }
      AddRowsTimesTile(rows, outs, count, layer.policy_kernel, shape.input_dim, nb);
    });
  }
}

// A (example, slot) that wants block j, with its probability.
struct Entry {
  float prob;
  int32_t example;
  int32_t slot;
};

// Sort key that orders NaN before every number (a strict weak order in all cases).
inline float SortKey(float prob) { return std::isnan(prob) ? INFINITY : prob; }

// A layer's trace outputs (XLA result buffers).
struct Trace {
  int32_t* block_index;  // [batch, k]
  bool* kept;            // [batch, k]
  int32_t* counts;       // [2]: candidates, kept
  float* probs;          // [batch, nb]
};

// p = eps + scale * sigmoid(logit); a block asks to run when p > 0.5 (always with exact_k,
// the `top_k` policy).
struct Policy {
  float eps;
  float scale;
  bool exact_k;
  bool Wants(float prob) const { return exact_k || prob > 0.5f; }
};

// Scratch that lives as long as its thread (no allocation per call once warm).
struct Scratch {
  std::vector<float> logits;     // [batch, nb]
  std::vector<float> slot_prob;  // [batch, k]
  std::vector<int32_t> order;    // [nb]
  std::vector<int64_t> ran;      // batch 1: the kept output slots
  std::vector<int64_t> inputs;   // batch 1: the kept input slots
  GemvJob job;                   // batch 1: the tasks of one product
};

// One example's probabilities `probs` [nb] from its logits and the layer's policy bias,
// and its k most probable blocks (ties: lower block id) with their probabilities into
// `block` [k] and `slot_prob` [k]. Returns how many blocks ask to run (all k with exact_k).
int64_t SelectTopK(const float* logits, const Layer& layer, const Policy& policy,
                   std::vector<int32_t>& order, float* probs, int32_t* block,
                   float* slot_prob) {
  const int64_t nb = layer.num_blocks, k = layer.example_capacity;
  int64_t candidates = 0;
  order.resize(nb);
  for (int64_t j = 0; j < nb; ++j) {
    const float z = logits[j] + layer.policy_bias[j];
    probs[j] = policy.eps + policy.scale * (1.0f / (1.0f + std::exp(-z)));
    candidates += probs[j] > 0.5f;
    order[j] = static_cast<int32_t>(j);
  }
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
    const float pa = SortKey(probs[a]), pb = SortKey(probs[b]);
    return pa > pb || (pa == pb && a < b);
  });
  for (int64_t s = 0; s < k; ++s) {
    block[s] = order[s];
    slot_prob[s] = probs[order[s]];
  }
  return policy.exact_k ? k : candidates;
}

// Adds the bias and applies ReLU to one compact block row [bs].
inline void BiasRelu(const float* bias, int64_t bs, float* out) {
  for (int64_t c = 0; c < bs; ++c) out[c] = std::max(out[c] + bias[c], 0.0f);
}

// Batch 1: one example per block and one triple per weight tile, so no capacity can bind
// and every slot that wants its block runs. Two jobs of matrix-vector tasks (see
// GemvJob): the policy logits (the first layer's [in, nb] policy, or the policy rows of
// the kept input blocks), then, after the selection, the kept blocks (dense input) or the
// kept (input block, output block) tiles, one group per kept output block, summed and
// passed through bias and ReLU. Each job runs on the calling thread and, when it reads
// enough and may use two threads, on the batch-1 helper thread too.
void RunLayerBatch1(const Layer& layer, const float* x, const Compact* input,
                    const Shape& shape, Workers& workers, const Policy& policy,
                    Scratch& scratch, float* probs, Compact& output, int64_t& candidates) {
  const int64_t bs = shape.block_size, k = layer.example_capacity, nb = layer.num_blocks;
  GemvJob& job = scratch.job;
  std::vector<int64_t>& inputs = scratch.inputs;  // kept input slots
  inputs.clear();
  job.Reset(nb);
  if (input == nullptr) {
    job.Add(x, layer.policy_kernel, shape.input_dim);
  } else {
    for (int64_t s = 0; s < input->slots; ++s) {
      if (!input->kept[s]) continue;
      inputs.push_back(s);
      job.Add(input->hidden.data() + s * bs, layer.policy_kernel + input->block[s] * bs * nb,
              bs);
    }
  }
  scratch.logits.resize(nb);
  job.EndGroup(scratch.logits.data());
  RunBatch1Job(job, workers.max_threads());

  output.slots = k;
  output.block.resize(k);
  output.kept.assign(k, 0);
  output.hidden.assign(k * bs, 0.0f);
  scratch.slot_prob.resize(k);
  candidates = SelectTopK(scratch.logits.data(), layer, policy, scratch.order, probs,
                          output.block.data(), scratch.slot_prob.data());
  std::vector<int64_t>& ran = scratch.ran;
  ran.clear();
  for (int64_t s = 0; s < k; ++s) {
    if (!policy.Wants(scratch.slot_prob[s])) continue;
    output.kept[s] = 1;
    ran.push_back(s);
  }
  output.num_kept = static_cast<int64_t>(ran.size());

  job.Reset(bs);
  for (int64_t s : ran) {
    const int64_t j = output.block[s];
    if (input == nullptr) {
      job.Add(x, layer.kernel + j * shape.input_dim * bs, shape.input_dim);
    } else {
      for (int64_t t : inputs) {
        job.Add(input->hidden.data() + t * bs,
                layer.kernel + (j * layer.in_blocks + input->block[t]) * bs * bs, bs);
      }
    }
    job.EndGroup(output.hidden.data() + s * bs);
  }
  RunBatch1Job(job, workers.max_threads());
  for (int64_t s : ran) {
    BiasRelu(layer.bias + output.block[s] * bs, bs, output.hidden.data() + s * bs);
  }
}

// Batch > 1: selection with the per-block and per-weight-tile capacities, then the kept
// (example, block) pairs block by block, each weight tile read once for all its rows.
void RunLayerGrouped(const Layer& layer, const float* x, const Compact* input,
                     const Shape& shape, Workers& workers, const Policy& policy,
                     Scratch& scratch, float* probs, Compact& output, int64_t& candidates) {
  const int64_t batch = shape.batch, bs = shape.block_size, nb = layer.num_blocks;
  const int64_t k = layer.example_capacity;
  PolicyLogits(layer, x, input, shape, workers, scratch.logits);

  // 1-2. Probabilities, per-example top-k (ties: lower block id), threshold.
  output.slots = k;
  output.block.assign(batch * k, 0);
  output.kept.assign(batch * k, 0);
  output.num_kept = 0;
  std::vector<float>& slot_prob = scratch.slot_prob;
  slot_prob.resize(batch * k);
  candidates = 0;
  for (int64_t e = 0; e < batch; ++e) {
    candidates += SelectTopK(scratch.logits.data() + e * nb, layer, policy, scratch.order,
                             probs + e * nb, output.block.data() + e * k,
                             slot_prob.data() + e * k);
  }

  // 3. Per-block capacity: the C most probable wanting examples (ties: lower example).
  std::vector<int64_t> start(nb + 1, 0);
  for (int64_t slot = 0; slot < batch * k; ++slot) {
    if (policy.Wants(slot_prob[slot])) ++start[output.block[slot] + 1];
  }
  for (int64_t j = 0; j < nb; ++j) start[j + 1] += start[j];
  std::vector<Entry> entries(start[nb]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t slot = 0; slot < batch * k; ++slot) {
    if (policy.Wants(slot_prob[slot])) {
      entries[fill[output.block[slot]]++] = {slot_prob[slot], static_cast<int32_t>(slot / k),
                                             static_cast<int32_t>(slot % k)};
    }
  }
  std::vector<int64_t> served(nb);  // entries of block j that run: [start[j], +served[j])
  for (int64_t j = 0; j < nb; ++j) {
    std::stable_sort(entries.begin() + start[j], entries.begin() + start[j + 1],
                     [](const Entry& a, const Entry& b) { return a.prob > b.prob; });
    served[j] = std::min(start[j + 1] - start[j], layer.block_capacity);
  }

  // 4. Per-weight-tile capacity (gated input): triples served in block j's order; an
  // (example, j) with an unserved triple is dropped whole (its uses still count).
  std::vector<uint8_t> run(entries.size(), 0);
  for (int64_t j = 0; j < nb; ++j) {
    std::vector<int64_t> uses(layer.in_blocks, 0);
    for (int64_t m = start[j]; m < start[j] + served[j]; ++m) {
      bool ok = true;
      if (input != nullptr) {
        const int64_t e = entries[m].example;
        for (int64_t s = 0; s < input->slots; ++s) {
          if (!input->kept[e * input->slots + s]) continue;
          if (uses[input->block[e * input->slots + s]]++ >= layer.pair_capacity) ok = false;
        }
      }
      run[m] = ok;
    }
  }
  for (int64_t m = 0; m < static_cast<int64_t>(entries.size()); ++m) {
    if (!run[m]) continue;
    const int64_t slot = entries[m].example * k + entries[m].slot;
    output.kept[slot] = 1;
    ++output.num_kept;
  }

  // 5. Products of the kept (example, block) pairs, block by block, reading tiles in place.
  output.hidden.assign(batch * k * bs, 0.0f);
  // Multiply-adds: kept pairs times the input's mean kept blocks (or its dense width).
  const int64_t depth = input == nullptr ? shape.input_dim : input->num_kept * bs / batch;
  workers.ParallelFor(nb, output.num_kept * depth * bs, [&](int64_t j) {
    std::vector<int64_t> members;  // examples of block j that run, in j's order
    std::vector<float*> outs;      // their compact output rows
    for (int64_t m = start[j]; m < start[j] + served[j]; ++m) {
      if (!run[m]) continue;
      members.push_back(entries[m].example);
      outs.push_back(output.hidden.data() + (entries[m].example * k + entries[m].slot) * bs);
    }
    if (members.empty()) return;
    std::vector<const float*> rows;
    if (input == nullptr) {
      for (int64_t e : members) rows.push_back(x + e * shape.input_dim);
      AddRowsTimesTile(rows.data(), outs.data(), static_cast<int64_t>(rows.size()),
                       layer.kernel + j * shape.input_dim * bs, shape.input_dim, bs);
    } else {
      // Tile-major: each active tile (i, j) is read once for all the rows that need it.
      struct Pair {
        int64_t in_block;
        const float* in;
        float* out;
      };
      std::vector<Pair> pairs;
      for (size_t r = 0; r < members.size(); ++r) {
        for (int64_t s = 0; s < input->slots; ++s) {
          const int64_t slot = members[r] * input->slots + s;
          if (input->kept[slot]) {
            pairs.push_back({input->block[slot], input->hidden.data() + slot * bs, outs[r]});
          }
        }
      }
      std::stable_sort(pairs.begin(), pairs.end(), [](const Pair& a, const Pair& b) {
        return a.in_block < b.in_block;
      });
      std::vector<float*> pair_outs;
      for (size_t p = 0; p < pairs.size();) {
        const int64_t i = pairs[p].in_block;
        rows.clear();
        pair_outs.clear();
        for (; p < pairs.size() && pairs[p].in_block == i; ++p) {
          rows.push_back(pairs[p].in);
          pair_outs.push_back(pairs[p].out);
        }
        AddRowsTimesTile(rows.data(), pair_outs.data(), static_cast<int64_t>(rows.size()),
                         layer.kernel + (j * layer.in_blocks + i) * bs * bs, bs, bs);
      }
    }
    const float* bias = layer.bias + j * bs;
    for (float* out : outs) BiasRelu(bias, bs, out);
  });
}

// Runs one layer: selection, capacities, products. Writes the trace and the compact
// output.
void RunLayer(const Layer& layer, const float* x, const Compact* input, const Shape& shape,
              Workers& workers, const Policy& policy, Scratch& scratch, const Trace& trace,
              Compact& output) {
  const int64_t batch = shape.batch, k = layer.example_capacity;
  int64_t candidates = 0;
  if (batch == 1) {
    RunLayerBatch1(layer, x, input, shape, workers, policy, scratch, trace.probs, output,
                   candidates);
  } else {
    RunLayerGrouped(layer, x, input, shape, workers, policy, scratch, trace.probs, output,
                    candidates);
  }
  std::copy(output.block.begin(), output.block.end(), trace.block_index);
  for (int64_t slot = 0; slot < batch * k; ++slot) trace.kept[slot] = output.kept[slot] != 0;
  trace.counts[0] = static_cast<int32_t>(candidates);
  trace.counts[1] = static_cast<int32_t>(output.num_kept);
}

// ---------------------------------------------------------------------- FFI glue

constexpr int64_t kTraceOutputs = 4;  // block_index, kept, counts, probs per layer

// What one thread keeps from call to call (capacity only; every call overwrites it).
struct CallState {
  std::vector<ffi::AnyBuffer> in, out;
  std::vector<Layer> layers;
  Compact hidden[2];  // layer l writes hidden[l % 2] from hidden[(l + 1) % 2]
  Scratch scratch;
};

std::string DimsString(ffi::AnyBuffer::Dimensions dims) {
  std::string text = "[";
  for (size_t d = 0; d < dims.size(); ++d) text += (d ? ", " : "") + std::to_string(dims[d]);
  return text + "]";
}

// An expected shape of up to three dimensions (no heap allocation: checked every call).
struct Dims {
  size_t size;
  int64_t value[3];
  Dims(std::initializer_list<int64_t> dims) : size(std::min<size_t>(dims.size(), 3)), value{} {
    std::copy(dims.begin(), dims.begin() + size, value);
  }
};

// Checks dtype and exact dimensions of a buffer; the message (naming `what`, of layer
// `layer` when >= 0) is built only on failure.
ffi::Error Expect(const ffi::AnyBuffer& buffer, ffi::DataType dtype, const Dims& dims,
                  const char* what, int64_t layer = -1) {
  const ffi::AnyBuffer::Dimensions actual = buffer.dimensions();
  bool same = buffer.element_type() == dtype && actual.size() == dims.size;
  for (size_t d = 0; same && d < dims.size; ++d) same = actual[d] == dims.value[d];
  if (same) return ffi::Error::Success();
  std::string expected = "[";
  for (size_t d = 0; d < dims.size; ++d) {
    expected += (d ? ", " : "") + std::to_string(dims.value[d]);
  }
  const std::string name =
      (layer >= 0 ? "layer " + std::to_string(layer) + " " : std::string()) + what;
  return ffi::Error::InvalidArgument(name + ": expected shape " + expected + "] of dtype " +
                                     std::to_string(static_cast<int>(dtype)) + ", got " +
                                     DimsString(actual) + " of dtype " +
                                     std::to_string(static_cast<int>(buffer.element_type())));
}

ffi::Error GatedMlpForwardImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                               ffi::Span<const int64_t> example_capacity,
                               ffi::Span<const int64_t> block_capacity,
                               ffi::Span<const int64_t> pair_capacity, float policy_eps,
                               float policy_scale, int64_t exact_k, int64_t num_threads) {
  const int64_t num_layers = static_cast<int64_t>(example_capacity.size());
  if (num_layers < 1 || static_cast<int64_t>(block_capacity.size()) != num_layers ||
      static_cast<int64_t>(pair_capacity.size()) != num_layers ||
      static_cast<int64_t>(args.size()) != 4 * num_layers + 3 ||
      static_cast<int64_t>(rets.size()) != kTraceOutputs * num_layers + 1) {
    return ffi::Error::InvalidArgument("gated_mlp_forward: inconsistent layer count");
  }
  // Buffers kept by the calling thread between calls: no allocation per call once warm.
  thread_local CallState state;
  std::vector<ffi::AnyBuffer>& in = state.in;
  std::vector<ffi::AnyBuffer>& out = state.out;
  std::vector<Layer>& layers = state.layers;
  in.clear();
  out.clear();
  layers.clear();
  for (size_t a = 0; a < args.size(); ++a) {
    ffi::ErrorOr<ffi::AnyBuffer> buffer = args.get<ffi::AnyBuffer>(a);
    if (buffer.has_error()) return buffer.error();
    in.push_back(*buffer);
  }
  for (size_t r = 0; r < rets.size(); ++r) {
    ffi::ErrorOr<ffi::Result<ffi::AnyBuffer>> buffer = rets.get<ffi::AnyBuffer>(r);
    if (buffer.has_error()) return buffer.error();
    out.push_back(**buffer);
  }
  if (in[0].dimensions().size() != 2 || in[1].dimensions().size() != 3 ||
      in[2].dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("gated_mlp_forward: x must be [batch, in], the first "
                                       "kernel [nb, in, bs] and its bias [nb, bs]");
  }
  Shape shape{in[0].dimensions()[0], in[0].dimensions()[1], in[1].dimensions()[2]};
  const int64_t batch = shape.batch, bs = shape.block_size;
  if (bs < 1) return ffi::Error::InvalidArgument("gated_mlp_forward: block size < 1");
  if (ffi::Error error = Expect(in[0], ffi::F32, {batch, shape.input_dim}, "x");
      error.failure()) {
    return error;
  }

  int64_t in_blocks = 0;
  for (int64_t l = 0; l < num_layers; ++l) {
    const ffi::AnyBuffer* buffers = &in[1 + 4 * l];
    const ffi::AnyBuffer* trace = &out[1 + kTraceOutputs * l];
    const int64_t nb = buffers[1].dimensions().size() == 0 ? -1 : buffers[1].dimensions()[0];
    const int64_t k = example_capacity[l];
    if (nb < 1 || k < 1 || k > nb || block_capacity[l] < 1 || pair_capacity[l] < 1) {
      return ffi::Error::InvalidArgument("gated_mlp_forward: layer " + std::to_string(l) +
                                         ": bad block count or capacities");
    }
    const Dims kernel_dims = l == 0 ? Dims{nb, shape.input_dim, bs} : Dims{nb * in_blocks, bs, bs};
    const Dims policy_dims = l == 0 ? Dims{shape.input_dim, nb} : Dims{in_blocks, bs, nb};
    for (ffi::Error error : {Expect(buffers[0], ffi::F32, kernel_dims, "kernel", l),
                             Expect(buffers[1], ffi::F32, {nb, bs}, "bias", l),
                             Expect(buffers[2], ffi::F32, policy_dims, "policy kernel", l),
                             Expect(buffers[3], ffi::F32, {nb}, "policy bias", l),
                             Expect(trace[0], ffi::S32, {batch, k}, "block_index", l),
                             Expect(trace[1], ffi::PRED, {batch, k}, "kept", l),
                             Expect(trace[2], ffi::S32, {2}, "counts", l),
                             Expect(trace[3], ffi::F32, {batch, nb}, "probs", l)}) {
      if (error.failure()) return error;
    }
    layers.push_back({static_cast<const float*>(buffers[0].untyped_data()),
                      static_cast<const float*>(buffers[1].untyped_data()),
                      static_cast<const float*>(buffers[2].untyped_data()),
                      static_cast<const float*>(buffers[3].untyped_data()), nb, in_blocks, k,
                      block_capacity[l], pair_capacity[l]});
    in_blocks = nb;
  }
  const ffi::AnyBuffer& output_kernel = in[4 * num_layers + 1];
  const ffi::AnyBuffer& output_bias = in[4 * num_layers + 2];
  const int64_t classes = output_bias.dimensions().size() == 0 ? -1 : output_bias.dimensions()[0];
  for (ffi::Error error :
       {Expect(output_kernel, ffi::F32, {in_blocks, bs, classes}, "output kernel"),
        Expect(output_bias, ffi::F32, {classes}, "output bias"),
        Expect(out[0], ffi::F32, {batch, classes}, "logits")}) {
    if (error.failure()) return error;
  }

  try {
    const float* x = static_cast<const float*>(in[0].untyped_data());
    Workers workers(pool, num_threads);
    const Policy policy{policy_eps, policy_scale, exact_k != 0};
    for (int64_t l = 0; l < num_layers; ++l) {
      const ffi::AnyBuffer* buffers = &out[1 + kTraceOutputs * l];
      const Trace trace{static_cast<int32_t*>(buffers[0].untyped_data()),
                        static_cast<bool*>(buffers[1].untyped_data()),
                        static_cast<int32_t*>(buffers[2].untyped_data()),
                        static_cast<float*>(buffers[3].untyped_data())};
      RunLayer(layers[l], x, l == 0 ? nullptr : &state.hidden[(l + 1) % 2], shape, workers,
               policy, state.scratch, trace, state.hidden[l % 2]);
    }
    const Compact& hidden = state.hidden[(num_layers + 1) % 2];
    float* logits = static_cast<float*>(out[0].untyped_data());
    const float* bias = static_cast<const float*>(output_bias.untyped_data());
    for (int64_t e = 0; e < batch; ++e) std::copy(bias, bias + classes, logits + e * classes);
    AddCompactTimesBlocks(hidden, static_cast<const float*>(output_kernel.untyped_data()),
                          classes, shape, workers, logits);
  } catch (const std::exception& error) {
    return ffi::Error::Internal(std::string("gated_mlp_forward: ") + error.what());
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace ccjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcjaxGatedMlpForward, ccjax::GatedMlpForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("example_capacity")
                                  .Attr<ffi::Span<const int64_t>>("block_capacity")
                                  .Attr<ffi::Span<const int64_t>>("pair_capacity")
                                  .Attr<float>("policy_eps")
                                  .Attr<float>("policy_scale")
                                  .Attr<int64_t>("exact_k")
                                  .Attr<int64_t>("num_threads"));

// Test hooks of the batch-1 helper thread (see Batch1Helper::SetTestMode and Stats);
// they start the helper when it is not running yet. Stats writes 4 counters: jobs shared
// with the helper, jobs offered to it but run alone, tasks the helper ran, stalls (all
// since the process started).
extern "C" int CcjaxBatch1HelperTestMode(int64_t pause, int64_t join_wait_us) {
  ccjax::Batch1Helper* helper = ccjax::Batch1Helper::Get();
  if (helper == nullptr) return 0;
  helper->SetTestMode(pause != 0, join_wait_us);
  return 1;
}
extern "C" int CcjaxBatch1HelperStats(int64_t* counters) {
  ccjax::Batch1Helper* helper = ccjax::Batch1Helper::Get();
  if (helper == nullptr) return 0;
  helper->Stats(counters);
  return 1;
}

// What ffi_cpu.py checks before registering the handler: the build it came from and the
// XLA FFI API version of the headers it was compiled against ("major.minor").
extern "C" const char* CcjaxFfiBuildKey() { return CCJAX_BUILD_KEY; }
extern "C" const char* CcjaxFfiApiVersion() {
#define CCJAX_STRINGIFY(x) #x
#define CCJAX_VERSION(major, minor) CCJAX_STRINGIFY(major) "." CCJAX_STRINGIFY(minor)
  return CCJAX_VERSION(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
}
