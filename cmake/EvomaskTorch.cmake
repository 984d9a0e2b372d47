# What the build needs to know about the torch it compiles against, asked of the Python that runs
# the build. The extension must link against exactly that torch (its C++ ABI changes between
# releases), which is also why the package is built with `pip install --no-build-isolation .`:
# an isolated build environment would install and compile against some other torch.
#
# Sets, in the caller's scope:
#   EVOMASK_TORCH_VERSION       torch.__version__, e.g. 2.14.1+cu130
#   EVOMASK_TORCH_CUDA_VERSION  torch.version.cuda, e.g. 13.0; empty for a CPU build of torch
#   EVOMASK_TORCH_SITE          the site-packages folder holding torch, where pip also puts the
#                               nvidia-* wheels torch depends on
# and adds torch's CMake package folder to CMAKE_PREFIX_PATH.
function(evomask_query_torch)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import os, torch; print(torch.utils.cmake_prefix_path); print(torch.__version__); print(torch.version.cuda or ''); print(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))))"
    OUTPUT_VARIABLE _info OUTPUT_STRIP_TRAILING_WHITESPACE
    ERROR_VARIABLE _error
    RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    string(STRIP "${_error}" _error)
    string(REGEX REPLACE ".*\n" "" _error "${_error}")
    message(FATAL_ERROR "evomask: ${Python_EXECUTABLE} cannot import torch (${_error}); install torch "
                        "into that environment first, then build with `pip install --no-build-isolation .`")
  endif()
  string(REPLACE "\n" ";" _info "${_info}")
  list(GET _info 0 _prefix)
  list(GET _info 1 _version)
  list(GET _info 2 _cuda)
  list(GET _info 3 _site)
  list(APPEND CMAKE_PREFIX_PATH "${_prefix}")
  set(CMAKE_PREFIX_PATH "${CMAKE_PREFIX_PATH}" PARENT_SCOPE)
  set(EVOMASK_TORCH_VERSION "${_version}" PARENT_SCOPE)
  set(EVOMASK_TORCH_CUDA_VERSION "${_cuda}" PARENT_SCOPE)
  set(EVOMASK_TORCH_SITE "${_site}" PARENT_SCOPE)
endfunction()
