# Finding the CUDA toolkit for a build against a pip-installed torch, and deciding whether the
# CUDA kernels can be built. Two separate questions:
#
# 1. Discovery (evomask_find_cuda_toolkit, before find_package(Torch)). A CUDA build of torch has
#    TorchConfig look for the toolkit itself and fail when it is found only half-way, even when our
#    CUDA kernels are not wanted. So whenever torch has CUDA and nvcc exists, the CUDA language is
#    enabled and the toolkit made findable, whatever EVOMASK_CUDA says.
# 2. The kernels (evomask_check_cuda_kernels, after find_package(Torch)). nvcc must be able to
#    compile torch's CUDA headers together with the CUDA headers torch was built with. pip's torch
#    brings those as nvidia-* wheels, which may be a newer CUDA than the local nvcc (torch 2.15 is
#    built with CUDA 13.2 and pulls 13.2+ headers, which met a 13.0 toolkit on our CI machines). A tiny .cu file
#    including ATen/cuda/CUDAContext.h is compiled at configure time with exactly the include
#    folders the kernels get; if that fails, AUTO builds the CPU kernels only, with one warning,
#    and ON stops.
#
# Variables this file reads: EVOMASK_CUDA (AUTO/ON/OFF), EVOMASK_TORCH_VERSION,
# EVOMASK_TORCH_CUDA_VERSION, EVOMASK_TORCH_SITE (cmake/EvomaskTorch.cmake), TORCH_CUDA_ARCH_LIST
# (cache or environment).

# Sets EVOMASK_CUDA_TOOLKIT (ON when torch has CUDA and nvcc was found; the CUDA language is then
# enabled). A macro, not a function: enable_language must run at file scope.
macro(evomask_find_cuda_toolkit)
  set(EVOMASK_CUDA_TOOLKIT OFF)
  if(EVOMASK_TORCH_CUDA_VERSION)
    include(CheckLanguage)
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      set(EVOMASK_CUDA_TOOLKIT ON)
    endif()
  endif()
  if(EVOMASK_CUDA_TOOLKIT)
    enable_language(CUDA)
    _evomask_cuda_toolkit_workarounds()
  endif()
endmacro()

macro(_evomask_cuda_toolkit_workarounds)
  # nvcc may be a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc). Torch's bundled
  # FindCUDA then guesses the toolkit root from the script's folder (/usr/local) and fails with
  # "missing: CUDA_INCLUDE_DIRS CUDA_CUDART_LIBRARY"; the CUDA language knows the real root.
  set(CUDA_TOOLKIT_ROOT_DIR "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}" CACHE PATH
      "CUDA toolkit root, from the CUDA compiler (a wrapper script may hide it)" FORCE)

  # The nvidia-* wheels torch depends on. A trimmed toolkit (as on machines that carry only the
  # compiler and the runtime) lacks the cuBLAS/cuSPARSE/cuSOLVER headers that ATen's CUDA headers
  # include, and has no nvrtc library, which TorchConfig puts into TORCH_LIBRARIES; the wheels have
  # both. CUDA 13 wheels share one folder (nvidia/cu13); CUDA 12 wheels have one folder each.
  string(REGEX MATCH "^[0-9]+" _evomask_cuda_major "${EVOMASK_TORCH_CUDA_VERSION}")
  set(EVOMASK_CUDA_WHEEL_ROOTS "")
  if(IS_DIRECTORY "${EVOMASK_TORCH_SITE}/nvidia/cu${_evomask_cuda_major}")
    set(EVOMASK_CUDA_WHEEL_ROOTS "${EVOMASK_TORCH_SITE}/nvidia/cu${_evomask_cuda_major}")
  else()
    file(GLOB EVOMASK_CUDA_WHEEL_ROOTS LIST_DIRECTORIES true "${EVOMASK_TORCH_SITE}/nvidia/*")
  endif()
  set(EVOMASK_CUDA_WHEEL_INCLUDE_DIRS "")
  set(_evomask_nvrtc_hints "")
  foreach(_root IN LISTS EVOMASK_CUDA_WHEEL_ROOTS)
    if(IS_DIRECTORY "${_root}/include")
      list(APPEND EVOMASK_CUDA_WHEEL_INCLUDE_DIRS "${_root}/include")
    endif()
    if(IS_DIRECTORY "${_root}/lib")
      list(APPEND _evomask_nvrtc_hints "${_root}/lib")
    endif()
  endforeach()
  # The wheel ships only the versioned libnvrtc.so.<major>, no unversioned link.
  find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.${_evomask_cuda_major}
               HINTS ${_evomask_nvrtc_hints} "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}/lib64")

  # Torch ignores CMAKE_CUDA_ARCHITECTURES and reads TORCH_CUDA_ARCH_LIST (dotted: "9.0", "8.0;9.0+PTX";
  # "90" is an error). With no GPU to probe it starts at sm_50, which nvcc 13 rejects. Default:
  # 8.0 (A100) and 9.0 (H100/H200) as machine code, plus 9.0 PTX that the driver compiles for
  # anything newer. Each target adds its device code generation to every .cu file (the host pass
  # over torch's headers is shared): one architecture compiles a fifth to a third faster. CI, which
  # has no GPU and only proves that the kernels compile and link, builds one.
  if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX")
  endif()
  if(DEFINED TORCH_CUDA_ARCH_LIST)
    set(ENV{TORCH_CUDA_ARCH_LIST} "${TORCH_CUDA_ARCH_LIST}")
  endif()
endmacro()

# Include folders for the CUDA sources, in search order. The toolkit's own headers come first, so
# that nvcc always sees the CUDA runtime and CCCL headers of its own version: CCCL refuses
# ("CUDA compiler and CUDA toolkit headers are incompatible") a cuda_runtime_api.h of another
# version, and the wheels carry torch's CUDA version. The wheels only fill in the headers the
# toolkit lacks (cuBLAS, cuSPARSE, cuSOLVER on a trimmed toolkit). On a full toolkit nvcc's own
# -I already wins; on a trimmed one the toolkit's include folder arrives only through Torch's
# -isystem list, after ours, so it has to be named here.
function(_evomask_cuda_include_dirs out_var)
  set(_dirs ${CUDAToolkit_INCLUDE_DIRS})
  if(NOT _dirs)
    set(_dirs "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}/include")
  endif()
  list(APPEND _dirs ${EVOMASK_CUDA_WHEEL_INCLUDE_DIRS})
  list(REMOVE_DUPLICATES _dirs)
  set(${out_var} "${_dirs}" PARENT_SCOPE)
endfunction()

# Compiles a .cu file including ATen/cuda/CUDAContext.h (the CUDA header every kernel includes) with
# the kernels' include folders and CUDA flags. Sets <ok_var> and, on failure, <why_var> to the first
# error line. Cached on everything it depends on: a reconfigure with the same tools skips it.
function(_evomask_probe_cuda_headers ok_var why_var)
  _evomask_cuda_include_dirs(_cuda_dirs)
  set(_dirs ${_cuda_dirs} ${TORCH_INCLUDE_DIRS})
  set(_key "${CMAKE_CUDA_COMPILER};${CMAKE_CUDA_COMPILER_VERSION};${EVOMASK_TORCH_VERSION};${_dirs};${CMAKE_CUDA_FLAGS}")
  if(DEFINED CACHE{_EVOMASK_CUDA_PROBE_KEY} AND "$CACHE{_EVOMASK_CUDA_PROBE_KEY}" STREQUAL "${_key}")
    set(${ok_var} "$CACHE{_EVOMASK_CUDA_PROBE_OK}" PARENT_SCOPE)
    set(${why_var} "$CACHE{_EVOMASK_CUDA_PROBE_WHY}" PARENT_SCOPE)
    return()
  endif()
  message(STATUS "evomask: checking that nvcc ${CMAKE_CUDA_COMPILER_VERSION} compiles torch's CUDA headers")
  set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)
  try_compile(_ok
    SOURCE_FROM_CONTENT evomask_cuda_probe.cu
      "#include <ATen/cuda/CUDAContext.h>\n__global__ void evomask_probe(int* x) { *x = 1; }\n"
    CMAKE_FLAGS "-DINCLUDE_DIRECTORIES=${_dirs}"
    CUDA_STANDARD 20
    CUDA_STANDARD_REQUIRED ON
    OUTPUT_VARIABLE _out)
  set(_why "")
  if(NOT _ok)
    string(REGEX MATCH "[^\n]*error[: ][^\n]*" _why "${_out}")
    string(STRIP "${_why}" _why)
    if(NOT _why)
      set(_why "the probe failed to compile")
    endif()
  endif()
  set(_EVOMASK_CUDA_PROBE_KEY "${_key}" CACHE INTERNAL "")
  set(_EVOMASK_CUDA_PROBE_OK "${_ok}" CACHE INTERNAL "")
  set(_EVOMASK_CUDA_PROBE_WHY "${_why}" CACHE INTERNAL "")
  set(${ok_var} "${_ok}" PARENT_SCOPE)
  set(${why_var} "${_why}" PARENT_SCOPE)
endfunction()

# Sets EVOMASK_CUDA_KERNELS (ON: compile the .cu files) from EVOMASK_CUDA and what can be built.
function(evomask_check_cuda_kernels)
  set(_kernels OFF)
  set(_why "")
  if(EVOMASK_CUDA STREQUAL "OFF")
    set(_why "EVOMASK_CUDA=OFF")
  elseif(NOT EVOMASK_TORCH_CUDA_VERSION)
    set(_why "torch ${EVOMASK_TORCH_VERSION} is a CPU build")
  elseif(NOT EVOMASK_CUDA_TOOLKIT)
    set(_why "no nvcc found (set CUDACXX or put nvcc on PATH)")
  else()
    string(REGEX MATCH "^[0-9]+\\.[0-9]+" _nvcc "${CMAKE_CUDA_COMPILER_VERSION}")
    string(REGEX MATCH "^[0-9]+" _nvcc_major "${_nvcc}")
    string(REGEX MATCH "^[0-9]+" _torch_major "${EVOMASK_TORCH_CUDA_VERSION}")
    string(CONCAT _versions "nvcc ${CMAKE_CUDA_COMPILER_VERSION} (${CMAKE_CUDA_COMPILER}) and torch "
                            "${EVOMASK_TORCH_VERSION}, built with CUDA ${EVOMASK_TORCH_CUDA_VERSION}")
    if(NOT _nvcc_major STREQUAL _torch_major)
      # Kernels from another major version would link another libcudart than the one torch loads.
      set(_why "${_versions}: different CUDA major versions")
    else()
      _evomask_probe_cuda_headers(_ok _error)
      if(_ok)
        set(_kernels ON)
      else()
        set(_why "${_versions}: nvcc cannot compile torch's CUDA headers (${_error})")
      endif()
    endif()
    if(NOT _kernels)
      string(CONCAT _fix "use an nvcc of CUDA ${EVOMASK_TORCH_CUDA_VERSION} (CUDACXX=/path/to/nvcc), or a "
                         "torch built with CUDA ${_nvcc}")
      if(EVOMASK_CUDA STREQUAL "ON")
        message(FATAL_ERROR "evomask: EVOMASK_CUDA=ON, but ${_why}; ${_fix}")
      endif()
      message(WARNING "evomask: building WITHOUT the CUDA kernels (CPU kernels only): ${_why}; ${_fix}, "
                      "or set EVOMASK_CUDA=OFF to build CPU-only without this warning")
      set(_why "see the warning above")
    endif()
  endif()
  if(NOT _kernels AND EVOMASK_CUDA STREQUAL "ON" AND _why)
    message(FATAL_ERROR "evomask: EVOMASK_CUDA=ON, but ${_why}")
  endif()
  set(EVOMASK_CUDA_KERNELS "${_kernels}" PARENT_SCOPE)
  if(_kernels)
    message(STATUS "evomask: CUDA kernels ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, torch CUDA "
                   "${EVOMASK_TORCH_CUDA_VERSION}, arch list $ENV{TORCH_CUDA_ARCH_LIST})")
  else()
    message(STATUS "evomask: CUDA kernels OFF (${_why})")
  endif()
endfunction()

# The CUDA include folders of evomask_check_cuda_kernels' probe, for <target>.
function(evomask_add_cuda_headers target)
  _evomask_cuda_include_dirs(_dirs)
  target_include_directories(${target} SYSTEM PRIVATE ${_dirs})
endfunction()
