// The little of Vitis HLS that the kernel uses, for g++ builds (csim and the emulation library).
// Under Vitis (csim, synthesis, co-simulation) the real headers are used instead.
#pragma once

#if defined(__SYNTHESIS__) || defined(__VITIS_HLS__)
#include <hls_stream.h>
#else
#include <deque>
#include <stdexcept>

namespace hls {

// A FIFO between dataflow processes. g++ runs the processes one after the other, so the stream
// must hold everything the producer writes: unbounded here, a small FIFO in hardware.
template <typename T>
class stream {
  public:
    stream() = default;
    explicit stream(const char *) {}
    stream(const stream &) = delete;
    stream &operator=(const stream &) = delete;

    void write(const T &value) { fifo_.push_back(value); }
    T read() {
        if (fifo_.empty()) throw std::runtime_error("hls::stream read from an empty stream (a dataflow process read more than was written)");
        T value = fifo_.front();
        fifo_.pop_front();
        return value;
    }
    bool empty() const { return fifo_.empty(); }

  private:
    std::deque<T> fifo_;
};

}  // namespace hls
#endif
