# nbhd_gencode(<out> <archs>): nvcc -gencode flags for NBHD_CUDA_ARCHS spellings
# ("80", "90a", ...): machine code for each, plus the PTX of the newest portable one
# (no `a` suffix: sm_90a's instructions exist on sm_90 only), which the driver
# compiles for a GPU newer than every listed one instead of failing at launch with
# cudaErrorNoKernelImageForDevice. A build of `a` architectures only carries no PTX;
# its backends refuse other GPUs in supports() (src/cuda/common/kernel_image.hpp).
function(nbhd_gencode out archs)
  set(flags "")
  set(ptx_arch "")
  foreach(arch IN LISTS archs)
    list(APPEND flags "-gencode=arch=compute_${arch},code=sm_${arch}")
    if(NOT arch MATCHES "a$" AND (ptx_arch STREQUAL "" OR arch GREATER ptx_arch))
      set(ptx_arch ${arch})
    endif()
  endforeach()
  if(NOT ptx_arch STREQUAL "")
    list(APPEND flags "-gencode=arch=compute_${ptx_arch},code=compute_${ptx_arch}")
  endif()
  set(${out} "${flags}" PARENT_SCOPE)
endfunction()
