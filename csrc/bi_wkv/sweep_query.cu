// The kQuery sweep for every head size (one translation unit per kind: parallel build).
#include "sweep_launch.cuh"

namespace rwkvclip {
template cudaError_t launch_sweep<Sweep::kQuery>(const SweepParams&, int, cudaStream_t);
}  // namespace rwkvclip
