/* LD_PRELOAD shim: a listening socket bound to "any address" binds to one address instead.
 *
 * Orthanc 1.10.1 (HTTP and DICOM) and DCMTK's dcmqrscp bind 0.0.0.0 and have no setting to
 * choose the address. Loaded with LD_PRELOAD, this replaces bind()'s INADDR_ANY with the IPv4
 * address in PREFECT_ORTHANC_BIND_ADDRESS (default 127.0.0.1) and an IPv6 in6addr_any with
 * ::1, so the process listens on loopback (or its host's own address) only. Any other bind()
 * passes through unchanged. Built by deployments/lab/bind_address.py with the machine's cc.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind = NULL;
    if (real_bind == NULL) {
        real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
        if (real_bind == NULL) {
            errno = ENOSYS;
            return -1;
        }
    }
    if (addr != NULL && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in in4;
        memcpy(&in4, addr, sizeof in4);
        if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) {
            const char *wanted = getenv("PREFECT_ORTHANC_BIND_ADDRESS");
            if (wanted == NULL || inet_pton(AF_INET, wanted, &in4.sin_addr) != 1) {
                in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            }
            return real_bind(fd, (const struct sockaddr *)&in4, sizeof in4);
        }
    } else if (addr != NULL && addr->sa_family == AF_INET6
               && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        memcpy(&in6, addr, sizeof in6);
        if (memcmp(&in6.sin6_addr, &in6addr_any, sizeof in6addr_any) == 0) {
            in6.sin6_addr = in6addr_loopback;
            return real_bind(fd, (const struct sockaddr *)&in6, sizeof in6);
        }
    }
    return real_bind(fd, addr, len);
}
