#include "kernel.h"
void virtio_irq(u32 gsi) { (void)gsi; }
