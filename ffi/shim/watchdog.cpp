// A rank's watch on its --nproc launcher, on a thread of its own: the JS event loop cannot run a timer while
// the rank blocks in a native call (a rendezvous or a collective waits up to its timeout), so the check lives
// here. Process plumbing only; no model logic.
#include "internal.h"

#include <unistd.h>

#include <chrono>
#include <thread>

extern "C" {

int32_t mt_exit_with_parent(mt_ctx* ctx, int32_t parent, const char* message, int32_t interval_ms) {
  return mt::guarded(ctx, [&]() -> int32_t {
    if (interval_ms < 1) throw std::invalid_argument("interval_ms must be >= 1");
    std::string text = message == nullptr ? std::string() : std::string(message);
    std::thread([parent, text, interval_ms] {
      for (;;) {
        if (getppid() != parent) {
          ssize_t written = write(STDERR_FILENO, text.data(), text.size());
          (void)written;  // nothing left to do if stderr is gone
          _exit(1);  // no atexit handlers needed: files are renamed into place whole, logs appended a line at a time
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(interval_ms));
      }
    }).detach();
    return 0;
  }, -1);
}

}  // extern "C"
