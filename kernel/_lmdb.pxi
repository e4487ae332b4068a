# The slice of the LMDB C API the kernel uses (Debian's liblmdb-dev).

cdef extern from "lmdb.h" nogil:
    ctypedef struct MDB_env:
        pass
    ctypedef struct MDB_txn:
        pass
    ctypedef struct MDB_cursor:
        pass
    ctypedef unsigned int MDB_dbi
    ctypedef struct MDB_val:
        size_t mv_size
        void *mv_data
    ctypedef struct MDB_stat:
        unsigned int ms_psize
        unsigned int ms_depth
        size_t ms_branch_pages
        size_t ms_leaf_pages
        size_t ms_overflow_pages
        size_t ms_entries
    ctypedef struct MDB_envinfo:
        void *me_mapaddr
        size_t me_mapsize
        size_t me_last_pgno
        size_t me_last_txnid
        unsigned int me_maxreaders
        unsigned int me_numreaders
    ctypedef enum MDB_cursor_op:
        MDB_FIRST
        MDB_NEXT
        MDB_SET_RANGE
    enum:
        MDB_SUCCESS
        MDB_NOTFOUND
        MDB_MAP_FULL
        MDB_CORRUPTED
        MDB_CREATE
        MDB_RDONLY
        MDB_NOTLS
        MDB_NORDAHEAD
        MDB_NOSYNC
        MDB_NOMETASYNC
        MDB_WRITEMAP
        MDB_APPEND
        MDB_NOOVERWRITE
        MDB_KEYEXIST
        MDB_CP_COMPACT

    int mdb_env_create(MDB_env **env)
    int mdb_env_open(MDB_env *env, const char *path, unsigned int flags, int mode)
    int mdb_env_set_mapsize(MDB_env *env, size_t size)
    int mdb_env_set_maxdbs(MDB_env *env, MDB_dbi dbs)
    int mdb_env_info(MDB_env *env, MDB_envinfo *stat)
    int mdb_env_stat(MDB_env *env, MDB_stat *stat)
    int mdb_env_get_fd(MDB_env *env, int *fd)
    int mdb_env_copy2(MDB_env *env, const char *path, unsigned int flags)
    void mdb_env_close(MDB_env *env)
    int mdb_txn_begin(MDB_env *env, MDB_txn *parent, unsigned int flags, MDB_txn **txn)
    int mdb_txn_commit(MDB_txn *txn)
    void mdb_txn_abort(MDB_txn *txn)
    void mdb_txn_reset(MDB_txn *txn)
    int mdb_txn_renew(MDB_txn *txn)
    int mdb_dbi_open(MDB_txn *txn, const char *name, unsigned int flags, MDB_dbi *dbi)
    int mdb_get(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data)
    int mdb_put(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data, unsigned int flags)
    int mdb_del(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data)
    int mdb_cursor_open(MDB_txn *txn, MDB_dbi dbi, MDB_cursor **cursor)
    int mdb_cursor_get(MDB_cursor *cursor, MDB_val *key, MDB_val *data, MDB_cursor_op op)
    void mdb_cursor_close(MDB_cursor *cursor)
    char *mdb_strerror(int err)
