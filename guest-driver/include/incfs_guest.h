/*
 * incfs_guest.h: the subset of libincfs's NDK interface (incfs_ndk.h) that a virtio-incfs
 * guest supports, implemented by libincfs_guest.a (guest-driver/, Rust).
 *
 * Same function names, types and error conventions as libincfs:
 *   - IncFsErrorCode functions return 0 (or a count) on success and -errno on failure;
 *   - functions returning IncFsFileId return the invalid id (all 0xff) on failure.
 * Differences, all documented in docs/pending-reads.md:
 *   - IncFs_GetControlFd(PENDING_READS) is an eventfd fed by a thread that holds a long poll
 *     on the mount's .pending_reads (virtio-fs cannot wake poll() on a file of the mount).
 *     It is readable (EPOLLIN) while pending reads are queued; call
 *     IncFs_WaitForPendingReads(control, 0, ...) to take them.
 *   - IncFs_GetMetrics takes the mount directory instead of a sysfs instance name.
 *   - Hash-tree blocks (INCFS_BLOCK_KIND_HASH) are accepted and ignored: the host has the tree.
 *   - Block counts report 0 hash blocks.
 * Pointers: NULL arguments are refused (-EINVAL, the invalid id, false or NULL), never
 * dereferenced; other pointers must be valid for the sizes given by the count or size argument
 * next to them, for the duration of the call. Strings are NUL-terminated unless noted. The
 * exact contract of each function is the "# Safety" section of guest-driver/src/ffi.rs.
 * Link: gcc -static prog.c libincfs_guest.a -lpthread -ldl -lm
 */
#ifndef INCFS_GUEST_H
#define INCFS_GUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    union {
        char data[16];
        int64_t for_alignment;
    };
} IncFsFileId;

static const IncFsFileId kIncFsInvalidFileId = {
    {{(char)-1, (char)-1, (char)-1, (char)-1, (char)-1, (char)-1, (char)-1, (char)-1,
      (char)-1, (char)-1, (char)-1, (char)-1, (char)-1, (char)-1, (char)-1, (char)-1}}};

static const int kIncFsFileIdStringLength = sizeof(IncFsFileId) * 2;

typedef enum {
    INCFS_FEATURE_NONE = 0,
    INCFS_FEATURE_CORE = 1 << 0,
} IncFsFeatures;

typedef int IncFsErrorCode;
typedef int64_t IncFsSize;
typedef int32_t IncFsBlockIndex;
typedef int IncFsFd;
typedef int IncFsUid;
typedef struct IncFsControl IncFsControl;

typedef struct {
    const char* data;
    IncFsSize size;
} IncFsSpan;

typedef enum {
    CMD,
    PENDING_READS,
    LOGS,
    BLOCKS_WRITTEN,
    FDS_COUNT,
} IncFsFdType;

/* The values are the compression byte of a .fill block header (incfs-wire's COMPRESSION_*). */
typedef enum {
    INCFS_COMPRESSION_KIND_NONE,
    INCFS_COMPRESSION_KIND_LZ4, /* refused with -EINVAL */
    INCFS_COMPRESSION_KIND_ZSTD,
} IncFsCompressionKind;

typedef enum {
    INCFS_BLOCK_KIND_DATA,
    INCFS_BLOCK_KIND_HASH,
} IncFsBlockKind;

typedef struct {
    IncFsFd fileFd;
    IncFsBlockIndex pageIndex;
    IncFsCompressionKind compression;
    IncFsBlockKind kind;
    uint32_t dataSize;
    const char* data;
} IncFsDataBlock;

typedef struct {
    IncFsFileId id;
    uint64_t bootClockTsUs; /* host wall clock, microseconds since the Unix epoch */
    IncFsBlockIndex block;
    uint32_t serialNo;
} IncFsReadInfo;

typedef struct {
    IncFsFileId id;
    uint64_t bootClockTsUs;
    IncFsBlockIndex block;
    uint32_t serialNo;
    IncFsUid uid;
} IncFsReadInfoWithUid;

typedef struct {
    IncFsBlockIndex begin;
    IncFsBlockIndex end;
} IncFsBlockRange;

typedef struct {
    IncFsBlockRange* dataRanges;
    IncFsBlockRange* hashRanges;
    int32_t dataRangesCount;
    int32_t hashRangesCount;
    IncFsBlockIndex endIndex;
} IncFsFilledRanges;

typedef struct {
    IncFsSize totalDataBlocks;
    IncFsSize filledDataBlocks;
    IncFsSize totalHashBlocks;
    IncFsSize filledHashBlocks;
} IncFsBlockCounts;

typedef struct {
    uint32_t readsDelayedMin;
    uint64_t readsDelayedMinUs;
    uint32_t readsDelayedPending;
    uint64_t readsDelayedPendingUs;
    uint32_t readsFailedHashVerification;
    uint32_t readsFailedOther;
    uint32_t readsFailedTimedOut;
    uint64_t reserved;
    uint64_t reserved1;
} IncFsMetrics;

typedef struct {
    IncFsFileId id;
    uint64_t timestampUs;
    IncFsBlockIndex block;
    uint32_t errorNo; /* negative errno, e.g. -ETIME; 0 when no read failed */
    IncFsUid uid;
} IncFsLastReadError;

static inline bool IncFs_IsValidFileId(IncFsFileId fileId) {
    return memcmp(&fileId, &kIncFsInvalidFileId, sizeof(fileId)) != 0;
}

bool IncFs_IsEnabled(void);
IncFsFeatures IncFs_Features(void);
bool IncFs_IsIncFsFd(int fd);
bool IncFs_IsIncFsPath(const char* path);

/* Writes 32 hex characters, no terminating NUL: out must hold kIncFsFileIdStringLength. */
int IncFs_FileIdToString(IncFsFileId id, char* out);
/* Reads exactly 32 characters (no NUL needed). */
IncFsFileId IncFs_FileIdFromString(const char* in);

/* dir: the mount point. NULL (errno set) if it is not a virtio-incfs mount. */
IncFsControl* IncFs_Open(const char* dir);
/* Also closes the fds IncFs_GetControlFd returned; nothing may use control afterwards. */
void IncFs_DeleteControl(IncFsControl* control);
/* The fd belongs to control: do not close it. */
IncFsFd IncFs_GetControlFd(const IncFsControl* control, IncFsFdType type);
/* *bufferSize: in capacity, out length of the root without its NUL; -ERANGE if it does not fit. */
IncFsErrorCode IncFs_Root(const IncFsControl* control, char buffer[], size_t* bufferSize);

/* path: absolute, or relative to the mount root. */
IncFsFileId IncFs_GetId(const IncFsControl* control, const char* path);

/* -ETIMEDOUT when nothing arrived within timeoutMs; *bufferSize: in capacity, out count. */
IncFsErrorCode IncFs_WaitForPendingReads(const IncFsControl* control, int32_t timeoutMs,
                                         IncFsReadInfo buffer[], size_t* bufferSize);
IncFsErrorCode IncFs_WaitForPendingReadsWithUid(const IncFsControl* control, int32_t timeoutMs,
                                                IncFsReadInfoWithUid buffer[], size_t* bufferSize);
IncFsErrorCode IncFs_WaitForPageReads(const IncFsControl* control, int32_t timeoutMs,
                                      IncFsReadInfo buffer[], size_t* bufferSize);
IncFsErrorCode IncFs_WaitForPageReadsWithUid(const IncFsControl* control, int32_t timeoutMs,
                                             IncFsReadInfoWithUid buffer[], size_t* bufferSize);

/* Blocks processed (present ones count), or -errno if the first failed: -EBADMSG (does not
 * match the hash tree; nothing stored), -E2BIG (dataSize > 8192), -ERANGE (pageIndex past
 * the end), -EINVAL (compression), -EBADF. */
IncFsErrorCode IncFs_WriteBlocks(const IncFsDataBlock blocks[], size_t blocksCount);

/* 0, or -ERANGE if outBuffer is too small (ranges that fit are valid). outBuffer.data must be
 * aligned for IncFsBlockRange; filledRanges->dataRanges points into it. */
IncFsErrorCode IncFs_GetFilledRanges(int fd, IncFsSpan outBuffer, IncFsFilledRanges* filledRanges);
IncFsErrorCode IncFs_GetFilledRangesStartingFrom(int fd, int startBlockIndex, IncFsSpan outBuffer,
                                                 IncFsFilledRanges* filledRanges);

/* 0 fully loaded, -ENODATA blocks missing, other -errno on error. */
IncFsErrorCode IncFs_IsFullyLoaded(int fd);
IncFsErrorCode IncFs_IsFullyLoadedByPath(const IncFsControl* control, const char* path);
IncFsErrorCode IncFs_IsFullyLoadedById(const IncFsControl* control, IncFsFileId fileId);
IncFsErrorCode IncFs_IsEverythingFullyLoaded(const IncFsControl* control);

IncFsErrorCode IncFs_GetFileBlockCountByPath(const IncFsControl* control, const char* path,
                                             IncFsBlockCounts* blockCount);
IncFsErrorCode IncFs_GetFileBlockCountById(const IncFsControl* control, IncFsFileId id,
                                           IncFsBlockCounts* blockCount);
/* -E2BIG when ids[] is too small; *bufferSize is then the number needed. */
IncFsErrorCode IncFs_ListIncompleteFiles(const IncFsControl* control, IncFsFileId ids[],
                                         size_t* bufferSize);

/* sysfsName: the mount directory. */
IncFsErrorCode IncFs_GetMetrics(const char* sysfsName, IncFsMetrics* metrics);
IncFsErrorCode IncFs_GetLastReadError(const IncFsControl* control,
                                      IncFsLastReadError* lastReadError);

#ifdef __cplusplus
}
#endif

#endif /* INCFS_GUEST_H */
