// kvcompose: attention-guided KV cache compression inside libllama.
//
// Plain C API exported from libllama by the kvcompose patch. Every function
// validates what the caller passes and answers with a status code; none of
// them aborts on bad input.
#pragma once

#include "llama.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Bumped whenever a function below changes signature or meaning. The Python
// package refuses to run against a library whose version differs from its own.
#define LLAMA_KVCOMPOSE_ABI_VERSION 2

enum llama_kvcompose_status {
    LLAMA_KVCOMPOSE_OK              =  0,
    LLAMA_KVCOMPOSE_ERR_ARGUMENT    = -1, // null pointer, bad size, flag or sequence id
    LLAMA_KVCOMPOSE_ERR_UNSUPPORTED = -2, // memory type, cache type or model not handled
    LLAMA_KVCOMPOSE_ERR_RANGE       = -3, // an index or count outside the valid range
    LLAMA_KVCOMPOSE_ERR_SEQUENCE    = -4, // a cell that does not belong to the sequence
    LLAMA_KVCOMPOSE_ERR_DUPLICATE   = -5, // the same cell twice in one head's list
    LLAMA_KVCOMPOSE_ERR_STATE       = -6, // call out of order (e.g. read before begin)
    LLAMA_KVCOMPOSE_ERR_COMPUTE     = -7, // allocating or computing a graph failed
};

// The ABI version this library was built with (LLAMA_KVCOMPOSE_ABI_VERSION).
LLAMA_API int32_t llama_kvcompose_abi_version(void);

// A static, human-readable name for a status code. Never NULL.
LLAMA_API const char * llama_kvcompose_status_str(int32_t status);

#ifdef __cplusplus
}
#endif

// Each concern declares its functions in its own header.
#include "llama-kvcompose-stats.h"
#include "llama-kvcompose-compact.h"
#include "llama-kvcompose-layout.h"
