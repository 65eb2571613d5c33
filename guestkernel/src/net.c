#include "kernel.h"
NORETURN void job_serve(void) { kputs("rayguest: net not implemented\n"); poweroff(); }
NORETURN void job_ping(const char *s) { (void)s; kputs("rayguest: net not implemented\n"); poweroff(); }
