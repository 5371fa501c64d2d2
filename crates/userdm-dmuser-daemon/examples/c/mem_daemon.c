/* SPDX-License-Identifier: MIT OR Apache-2.0
 *
 * A RAM-disk dm-user daemon in C, with no library: written from docs/dm-user-protocol.md.
 *
 *   cc -O2 -pthread -o mem_daemon_c mem_daemon.c
 *   mem_daemon_c <endpoint> <size-bytes | file> [threads]
 *
 * With a size, the disk is anonymous memory; with a file, the file is mapped shared, so what
 * the daemon acknowledged survives the daemon (kill -9 it and start another).
 *
 * <endpoint> is userdm's control socket (/dev/dm-user/<ctl>, or $USERDM_DMUSER_DIR/<ctl>), or
 * a dm-user kernel's misc device: a character device is open()ed, anything else connect()ed.
 * Each thread has its own channel. The daemon exits 0 when the target is removed (end of
 * stream from userdm, ENOTBLK from a dm-user kernel).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* The wire header: five native-endian u64s, 40 bytes (struct dm_user_message). */
struct dm_user_message {
	uint64_t seq;
	uint64_t type;
	uint64_t flags;
	uint64_t sector;
	uint64_t len;
};
_Static_assert(sizeof(struct dm_user_message) == 40, "header is 40 bytes");

enum {
	REQ_READ = 0,
	REQ_WRITE = 1,
	REQ_FLUSH = 2,
	REQ_DISCARD = 3,
	REQ_SECURE_ERASE = 4,
	REQ_WRITE_ZEROES = 6,
};
enum { RESP_SUCCESS = 0, RESP_ERROR = 1, RESP_UNSUPPORTED = 2 };

static const char *endpoint;
static uint8_t *disk;
static uint64_t disk_bytes;
static int backed;
static pthread_mutex_t disk_lock = PTHREAD_MUTEX_INITIALIZER;

/* Reads exactly len bytes. Returns 1 on success, 0 at the end of the target, -1 on error.
 * Reads may return less than asked at any point: loop. */
static int read_all(int fd, void *buf, size_t len)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = read(fd, (char *)buf + done, len - done);
		if (n == 0)
			return 0;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			/* ENOTBLK: a dm-user kernel removed the target. ECONNRESET: userdm closed the
			 * channel while it still held bytes we had not read, which is its removal too. */
			if (errno == ENOTBLK || errno == ECONNRESET)
				return 0;
			return -1;
		}
		done += (size_t)n;
	}
	return 1;
}

/* Writes exactly len bytes (writes may be short too). */
static int write_all(int fd, const void *buf, size_t len)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = write(fd, (const char *)buf + done, len - done);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		done += (size_t)n;
	}
	return 0;
}

static int open_channel(const char *path)
{
	struct stat st;
	if (stat(path, &st) == 0 && S_ISCHR(st.st_mode))
		return open(path, O_RDWR | O_CLOEXEC);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(addr.sun_path)) {
		errno = ENAMETOOLONG;
		close(fd);
		return -1;
	}
	strcpy(addr.sun_path, path);
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static int in_range(const struct dm_user_message *m)
{
	uint64_t off = m->sector * 512;
	return m->sector <= UINT64_MAX / 512 && off <= disk_bytes && m->len <= disk_bytes - off;
}

static void *serve(void *arg)
{
	(void)arg;
	int fd = open_channel(endpoint);
	if (fd < 0) {
		perror(endpoint);
		exit(1);
	}
	uint8_t *buf = NULL;
	size_t buf_bytes = 0;
	for (;;) {
		struct dm_user_message m;
		int r = read_all(fd, &m, sizeof(m));
		if (r == 0)
			break;
		if (r < 0) {
			perror("read header");
			exit(1);
		}
		/* Only WRITE carries data after its header. */
		if (m.len > buf_bytes && (m.type == REQ_WRITE || m.type == REQ_READ)) {
			if (m.len > (64u << 20)) {
				fprintf(stderr, "request of %llu bytes is too large\n",
					(unsigned long long)m.len);
				exit(1);
			}
			free(buf);
			buf = malloc(m.len);
			buf_bytes = m.len;
			if (!buf) {
				perror("malloc");
				exit(1);
			}
		}
		if (m.type == REQ_WRITE) {
			r = read_all(fd, buf, m.len);
			if (r == 0)
				break;
			if (r < 0) {
				perror("read data");
				exit(1);
			}
		}

		uint64_t status = RESP_SUCCESS;
		size_t reply_data = 0;
		pthread_mutex_lock(&disk_lock);
		switch (m.type) {
		case REQ_READ:
			if (!in_range(&m)) {
				status = RESP_ERROR;
				break;
			}
			memcpy(buf, disk + m.sector * 512, m.len);
			reply_data = m.len;
			break;
		case REQ_WRITE:
			if (!in_range(&m)) {
				status = RESP_ERROR;
				break;
			}
			memcpy(disk + m.sector * 512, buf, m.len);
			break;
		case REQ_FLUSH:
			if (backed && msync(disk, disk_bytes, MS_SYNC) < 0)
				status = RESP_ERROR;
			break;
		case REQ_DISCARD:
		case REQ_SECURE_ERASE:
		case REQ_WRITE_ZEROES:
			if (!in_range(&m)) {
				status = RESP_ERROR;
				break;
			}
			memset(disk + m.sector * 512, 0, m.len);
			break;
		default:
			status = RESP_UNSUPPORTED;
		}
		pthread_mutex_unlock(&disk_lock);

		/* The reply: the request's header with type = status, then the data of a successful
		 * READ (never data after an error). */
		m.type = status;
		if (write_all(fd, &m, sizeof(m)) < 0 ||
		    (reply_data && write_all(fd, buf, reply_data) < 0)) {
			perror("write reply");
			exit(1);
		}
	}
	free(buf);
	close(fd);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s <endpoint> <size-bytes | file> [threads]\n", argv[0]);
		return 2;
	}
	endpoint = argv[1];
	int threads = argc > 3 ? atoi(argv[3]) : 1;
	if (threads < 1)
		threads = 1;
	if (argv[2][0] >= '0' && argv[2][0] <= '9') {
		disk_bytes = strtoull(argv[2], NULL, 0);
		disk = calloc(1, disk_bytes ? disk_bytes : 1);
		if (!disk) {
			perror("calloc");
			return 1;
		}
	} else {
		int fd = open(argv[2], O_RDWR | O_CLOEXEC);
		struct stat st;
		if (fd < 0 || fstat(fd, &st) < 0 || st.st_size == 0) {
			perror(argv[2]);
			return 1;
		}
		disk_bytes = (uint64_t)st.st_size;
		disk = mmap(NULL, disk_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (disk == MAP_FAILED) {
			perror("mmap");
			return 1;
		}
		backed = 1;
	}
	pthread_t tids[64];
	if (threads > 64)
		threads = 64;
	for (int i = 0; i < threads; i++)
		pthread_create(&tids[i], NULL, serve, NULL);
	for (int i = 0; i < threads; i++)
		pthread_join(tids[i], NULL);
	return 0;
}
