// Says what this build of the extension holds: the device types with compiled kernels and the
// torch it was built against (fastscale/_extension.py reads it to know what the dispatcher has).
#include <string>

#include <torch/library.h>
#include <torch/version.h>

namespace fastscale {

std::string build_info() {
  std::string devices = "cpu";
#ifdef WITH_CUDA
  devices += ",cuda";
#endif
  return devices + ";torch " + std::to_string(TORCH_VERSION_MAJOR) + "." +
         std::to_string(TORCH_VERSION_MINOR) + "." + std::to_string(TORCH_VERSION_PATCH);
}

}  // namespace fastscale

// The tensor ops' schemas are declared in Python (fastscale/ops.py); this one has no tensors
// and no pure-torch twin, so it is defined where it is implemented.
TORCH_LIBRARY_FRAGMENT(fastscale, m) { m.def("build_info() -> str", &fastscale::build_info); }
