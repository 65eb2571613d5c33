#include "kernel.h"
NORETURN void job_blk(int mode) { (void)mode; kputs("rayguest: blk not implemented\n"); poweroff(); }
