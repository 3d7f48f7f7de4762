// The kKey sweep for every head size (one translation unit per kind: parallel build).
#include "sweep_launch.cuh"

namespace rwkvclip {
template cudaError_t launch_sweep<Sweep::kKey>(const SweepParams&, int, cudaStream_t);
}  // namespace rwkvclip
