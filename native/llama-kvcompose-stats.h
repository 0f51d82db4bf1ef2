// kvcompose: see llama-kvcompose.h for the conventions (status codes, ABI version).
#pragma once

#include "llama.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#ifdef __cplusplus
}
#endif
