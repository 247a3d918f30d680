-- Pushes, idempotency keys, quota counters and uploads.
-- Times are integer unix milliseconds (UTC); JSON is text; booleans are 0/1.

create table pushes (
    id               text    primary key,                -- UUIDv7: sorts by creation time
    app              text    not null,
    appkey           text    not null,
    platform         text    not null,
    cast_type        text    not null,
    task_class       integer not null,
    production_mode  integer not null,
    client           text    not null,
    out_biz_no       text,
    fingerprint      text    not null,
    status           text    not null,
    description      text,
    request          text    not null,
    umeng_request    text,
    umeng_response   text,
    msg_id           text,
    task_id          text,
    file_id          text,
    error_code       text,
    error_msg        text,
    http_status      integer,
    quota_kind       text,
    quota_window     integer,                            -- window start, epoch seconds
    quota_limit      integer,                            -- the limit in force at admission
    quota_refunded   integer not null default 0,
    task_status      text,
    task_checked_at  integer,
    latency_ms       integer,
    created_at       integer not null,
    sent_at          integer,
    finished_at      integer,
    updated_at       integer not null
);

create index pushes_created_idx on pushes (created_at desc, id desc);
create index pushes_app_idx on pushes (app, id desc);
create index pushes_status_idx on pushes (status, id desc);
create index pushes_out_biz_no_idx on pushes (out_biz_no) where out_biz_no is not null;
create index pushes_msg_id_idx on pushes (msg_id) where msg_id is not null;
create index pushes_task_id_idx on pushes (task_id) where task_id is not null;
create index pushes_client_idx on pushes (client, id desc);
create index pushes_pending_idx on pushes (created_at) where status = 'pending';

create table idempotency_keys (
    appkey       text    not null,
    out_biz_no   text    not null,
    fingerprint  text    not null,
    push_id      text    not null references pushes (id) on delete cascade,
    created_at   integer not null,
    primary key (appkey, out_biz_no)
);

create index idempotency_keys_push_idx on idempotency_keys (push_id);

create table quota_counters (
    appkey        text    not null,
    kind          text    not null,
    window_start  integer not null,                      -- epoch seconds
    used          integer not null check (used >= 0),
    primary key (appkey, kind, window_start)
);

create table uploads (
    appkey          text    not null,
    content_sha256  text    not null,
    file_id         text    not null,
    created_at      integer not null,
    primary key (appkey, content_sha256)
);
