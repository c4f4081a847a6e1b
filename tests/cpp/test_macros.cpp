#include "common/macros.h"
int main() { return ksl::kMean == 1 ? 0 : 1; }
