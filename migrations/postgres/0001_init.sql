-- Pushes, idempotency keys, quota counters, uploads, and the one-round-trip admission.

create table pushes (
    id               text        primary key,            -- UUIDv7: sorts by creation time
    app              text        not null,
    appkey           text        not null,
    platform         text        not null,
    cast_type        text        not null,
    task_class       boolean     not null,
    production_mode  boolean     not null,
    client           text        not null,
    out_biz_no       text,
    fingerprint      text        not null,
    status           text        not null,
    description      text,
    request          jsonb       not null,
    umeng_request    jsonb,
    umeng_response   jsonb,
    msg_id           text,
    task_id          text,
    file_id          text,
    error_code       text,
    error_msg        text,
    http_status      integer,
    quota_kind       text,
    quota_window     bigint,                             -- window start, epoch seconds
    quota_limit      integer,                            -- the limit in force at admission
    quota_refunded   boolean     not null default false,
    task_status      jsonb,
    task_checked_at  timestamptz,
    latency_ms       bigint,
    created_at       timestamptz not null default now(),
    sent_at          timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz not null default now()
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
    appkey       text        not null,
    out_biz_no   text        not null,
    fingerprint  text        not null,
    push_id      text        not null references pushes (id) on delete cascade,
    created_at   timestamptz not null default now(),
    primary key (appkey, out_biz_no)
);

create index idempotency_keys_push_idx on idempotency_keys (push_id);

create table quota_counters (
    appkey        text    not null,
    kind          text    not null,
    window_start  bigint  not null,                      -- epoch seconds
    used          integer not null check (used >= 0),
    primary key (appkey, kind, window_start)
);

create table uploads (
    appkey          text        not null,
    content_sha256  text        not null,
    file_id         text        not null,
    created_at      timestamptz not null default now(),
    primary key (appkey, content_sha256)
);

-- Admission in one statement: claim or reclaim the key, take the quota slot, insert the
-- pending push. Any outcome other than 'admitted' undoes everything this call wrote (the
-- inner block is rolled back by raising), so a rejected request leaves no trace.
-- Windows are Beijing calendar windows computed from this database's clock.
create function umgw_admit(
    p_id              text,
    p_app             text,
    p_appkey          text,
    p_platform        text,
    p_cast_type       text,
    p_task_class      boolean,
    p_production_mode boolean,
    p_client          text,
    p_out_biz_no      text,
    p_fingerprint     text,
    p_request         jsonb,
    p_description     text,
    p_quota_kind      text,     -- null: no quota
    p_quota_limit     integer,
    p_quota_unit      bigint    -- window length in seconds
)
returns table (
    outcome          text,      -- admitted | rate_limited | replay | in_flight | mismatch
    push_id          text,
    reclaimed_from   text,
    used             integer,
    window_start     bigint,
    reset_after_secs bigint
)
language plpgsql
as $$
#variable_conflict use_column
declare
    v_epoch     double precision := extract(epoch from now());
    v_window    bigint;
    v_reset     bigint;
    v_used      integer;
    v_outcome   text := 'admitted';
    v_push_id   text := p_id;
    v_reclaimed text;
    v_owner     text;
    v_fp        text;
    v_status    text;
    v_attempt   integer := 0;
begin
    if p_quota_kind is not null then
        v_window := (floor((v_epoch + 28800) / p_quota_unit) * p_quota_unit - 28800)::bigint;
        v_reset := greatest(1, ceil(v_window + p_quota_unit - v_epoch))::bigint;
    end if;

    begin
        insert into pushes (id, app, appkey, platform, cast_type, task_class, production_mode,
                            client, out_biz_no, fingerprint, status, description, request,
                            quota_kind, quota_window, quota_limit)
        values (p_id, p_app, p_appkey, p_platform, p_cast_type, p_task_class, p_production_mode,
                p_client, p_out_biz_no, p_fingerprint, 'pending', p_description, p_request,
                p_quota_kind, v_window, case when p_quota_kind is null then null else p_quota_limit end);

        if p_out_biz_no is not null then
            loop
                v_attempt := v_attempt + 1;
                -- Waits for a concurrent uncommitted claim of the same key, then sees it.
                insert into idempotency_keys (appkey, out_biz_no, fingerprint, push_id)
                values (p_appkey, p_out_biz_no, p_fingerprint, p_id)
                on conflict (appkey, out_biz_no) do nothing;
                exit when found;

                select k.fingerprint, k.push_id, p.status
                  into v_fp, v_owner, v_status
                  from idempotency_keys k
                  join pushes p on p.id = k.push_id
                 where k.appkey = p_appkey and k.out_biz_no = p_out_biz_no;

                if not found then
                    -- The key vanished between the two statements (retention); try again.
                    if v_attempt < 3 then
                        continue;
                    end if;
                    raise exception 'idempotency key % kept changing', p_out_biz_no;
                end if;

                if v_fp <> p_fingerprint then
                    v_outcome := 'mismatch';
                    v_push_id := v_owner;
                elsif v_status = 'pending' then
                    v_outcome := 'in_flight';
                    v_push_id := v_owner;
                elsif v_status = 'failed' or (v_status = 'unknown' and p_task_class) then
                    -- Guarded takeover: of two concurrent reclaims only one matches the old
                    -- owner; the other re-evaluates against the new owner and loses.
                    update idempotency_keys
                       set push_id = p_id, fingerprint = p_fingerprint, created_at = now()
                     where appkey = p_appkey and out_biz_no = p_out_biz_no
                       and push_id = v_owner;
                    if found then
                        v_reclaimed := v_owner;
                    else
                        v_outcome := 'in_flight';
                        select k.push_id into v_push_id
                          from idempotency_keys k
                         where k.appkey = p_appkey and k.out_biz_no = p_out_biz_no;
                    end if;
                else
                    v_outcome := 'replay';
                    v_push_id := v_owner;
                end if;
                exit;
            end loop;

            if v_outcome <> 'admitted' then
                raise exception using errcode = 'UG001';
            end if;
        end if;

        if p_quota_kind is not null then
            if p_quota_limit > 0 then
                insert into quota_counters as q (appkey, kind, window_start, used)
                values (p_appkey, p_quota_kind, v_window, 1)
                on conflict (appkey, kind, window_start)
                do update set used = q.used + 1 where q.used < p_quota_limit
                returning q.used into v_used;
            end if;
            if v_used is null then
                select q.used into v_used
                  from quota_counters q
                 where q.appkey = p_appkey and q.kind = p_quota_kind and q.window_start = v_window;
                v_used := coalesce(v_used, 0);
                v_outcome := 'rate_limited';
                v_push_id := null;
                raise exception using errcode = 'UG001';
            end if;
        end if;
    exception
        when sqlstate 'UG001' then
            null; -- everything in the block is undone; v_outcome says why
    end;

    return query select v_outcome, v_push_id, v_reclaimed, v_used, v_window, v_reset;
end
$$;
