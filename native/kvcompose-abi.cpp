#include "llama-kvcompose.h"

int32_t llama_kvcompose_abi_version(void) {
    return LLAMA_KVCOMPOSE_ABI_VERSION;
}

const char * llama_kvcompose_status_str(int32_t status) {
    switch (status) {
        case LLAMA_KVCOMPOSE_OK:              return "ok";
        case LLAMA_KVCOMPOSE_ERR_ARGUMENT:    return "invalid argument";
        case LLAMA_KVCOMPOSE_ERR_UNSUPPORTED: return "unsupported memory, cache type or model";
        case LLAMA_KVCOMPOSE_ERR_RANGE:       return "index or count out of range";
        case LLAMA_KVCOMPOSE_ERR_SEQUENCE:    return "cell does not belong to the sequence";
        case LLAMA_KVCOMPOSE_ERR_DUPLICATE:   return "duplicate cell in a head's index list";
        case LLAMA_KVCOMPOSE_ERR_STATE:       return "call out of order";
        case LLAMA_KVCOMPOSE_ERR_COMPUTE:     return "graph allocation or compute failed";
    }
    return "unknown status";
}
