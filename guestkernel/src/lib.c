/* rayguest: memory and string helpers (gcc may emit calls to the mem*). */
#include "kernel.h"

/* memcpy moves 8 bytes per rep iteration and the rest one by one: under
 * the instruction emulator every iteration costs about as much as an
 * instruction. */
void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;
	size_t q = n >> 3, r = n & 7;
	__asm__ volatile("rep movsq" : "+D"(d), "+S"(src), "+c"(q) : : "memory");
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(r) : : "memory");
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;
	if (d <= s || d >= s + n)
		return memcpy(dst, src, n);
	while (n--)
		d[n] = s[n];
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (size_t i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

int streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

int startswith(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

static int digit(char c, int base)
{
	int v;
	if (c >= '0' && c <= '9')
		v = c - '0';
	else if (c >= 'a' && c <= 'f')
		v = c - 'a' + 10;
	else if (c >= 'A' && c <= 'F')
		v = c - 'A' + 10;
	else
		return -1;
	return v < base ? v : -1;
}

const char *parse_u64(const char *s, int base, u64 *out)
{
	if (base == 0) {
		base = 10;
		if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X') && digit(s[2], 16) >= 0) {
			base = 16;
			s += 2;
		} else if (s[0] == '0' && digit(s[1], 8) >= 0) {
			base = 8;
		}
	}
	u64 v = 0;
	int d, any = 0;
	while ((d = digit(*s, base)) >= 0) {
		if (v > (~0ULL - (u64)d) / (u64)base)
			return NULL;
		v = v * (u64)base + (u64)d;
		s++;
		any = 1;
	}
	if (!any)
		return NULL;
	*out = v;
	return s;
}

/* parse_ipv4 reads dotted-quad A.B.C.D into host order. */
int parse_ipv4(const char *s, u32 *ip, const char **end)
{
	u32 v = 0;
	for (int i = 0; i < 4; i++) {
		u64 part;
		if (i > 0) {
			if (*s != '.')
				return 0;
			s++;
		}
		const char *e = parse_u64(s, 10, &part);
		if (!e || part > 255 || e - s > 3)
			return 0;
		v = v << 8 | (u32)part;
		s = e;
	}
	*ip = v;
	if (end)
		*end = s;
	return 1;
}
