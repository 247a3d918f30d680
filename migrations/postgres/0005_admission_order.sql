-- Admission writes the push row last: the key is resolved and the quota slot taken first,
-- so a replay, 409, 422 or 429 writes nothing (before, the whole row, request included, was
-- inserted and then rolled back, which cost WAL and table bloat on every rejection).
--
-- The key now names its push before the push row exists within the admitting transaction,
-- so its foreign key is checked at commit.
alter table idempotency_keys
    alter constraint idempotency_keys_push_id_fkey deferrable initially deferred;

-- Take one slot of a bucket's window if it has room; returns the new count, or null when
-- the window is full (or the limit is 0).
create function umgw_take_slot(
    p_appkey text,
    p_kind   text,
    p_window bigint,
    p_limit  integer
)
returns integer
language plpgsql
as $$
declare
    v_used integer;
begin
    if p_limit <= 0 then
        return null;
    end if;
    insert into quota_counters as q (appkey, kind, window_start, used)
    values (p_appkey, p_kind, p_window, 1)
    on conflict (appkey, kind, window_start)
    do update set used = q.used + 1 where q.used < p_limit
    returning q.used into v_used;
    return v_used;
end
$$;

create or replace function umgw_admit(
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
    v_claimed   boolean := false;
    v_reclaim   text;
    v_owner     text;
    v_fp        text;
    v_status    text;
    v_attempt   integer := 0;
begin
    if p_quota_kind is not null then
        v_window := (floor((v_epoch + 28800) / p_quota_unit) * p_quota_unit - 28800)::bigint;
        v_reset := greatest(1, ceil(v_window + p_quota_unit - v_epoch))::bigint;
    end if;

    -- 1. The key: claim it, or find out who has it. Rejections return here, having written
    --    nothing.
    if p_out_biz_no is not null then
        loop
            v_attempt := v_attempt + 1;
            -- Waits for a concurrent uncommitted claim of the same key, then sees it.
            insert into idempotency_keys (appkey, out_biz_no, fingerprint, push_id)
            values (p_appkey, p_out_biz_no, p_fingerprint, p_id)
            on conflict (appkey, out_biz_no) do nothing;
            if found then
                v_claimed := true;
                exit;
            end if;

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
                return query select 'mismatch'::text, v_owner, null::text, null::integer,
                                    v_window, v_reset;
                return;
            elsif v_status = 'pending' then
                return query select 'in_flight'::text, v_owner, null::text, null::integer,
                                    v_window, v_reset;
                return;
            elsif v_status = 'failed' or (v_status = 'unknown' and p_task_class) then
                v_reclaim := v_owner;
                exit;
            else
                return query select 'replay'::text, v_owner, null::text, null::integer,
                                    v_window, v_reset;
                return;
            end if;
        end loop;
    end if;

    -- 2. The quota slot.
    if v_reclaim is null then
        -- The common path: no subtransaction. A full window gives back the key just claimed.
        if p_quota_kind is not null then
            v_used := umgw_take_slot(p_appkey, p_quota_kind, v_window, p_quota_limit);
            if v_used is null then
                if v_claimed then
                    delete from idempotency_keys k
                     where k.appkey = p_appkey and k.out_biz_no = p_out_biz_no
                       and k.push_id = p_id;
                end if;
                select q.used into v_used
                  from quota_counters q
                 where q.appkey = p_appkey and q.kind = p_quota_kind
                   and q.window_start = v_window;
                return query select 'rate_limited'::text, null::text, null::text,
                                    coalesce(v_used, 0), v_window, v_reset;
                return;
            end if;
        end if;
    else
        -- Taking a key over from a failed (or unknown task-class) push: a full window must
        -- undo the takeover and the refund below, so this part runs in a subtransaction.
        begin
            -- Guarded takeover: of two concurrent reclaims only one matches the old owner;
            -- the other re-evaluates against the new owner and loses.
            update idempotency_keys k
               set push_id = p_id, fingerprint = p_fingerprint, created_at = now()
             where k.appkey = p_appkey and k.out_biz_no = p_out_biz_no
               and k.push_id = v_reclaim;
            if not found then
                select k.push_id into v_owner
                  from idempotency_keys k
                 where k.appkey = p_appkey and k.out_biz_no = p_out_biz_no;
                return query select 'in_flight'::text, v_owner, null::text, null::integer,
                                    v_window, v_reset;
                return;
            end if;
            -- One logical push holds one slot: a retry of an unknown task-class push carries
            -- the same out_biz_no upstream, so Umeng dedupes it into the same task. The slot
            -- the unknown attempt kept goes back before the retry takes its own.
            with r as (
                update pushes p
                   set quota_refunded = true, updated_at = now()
                 where p.id = v_reclaim and p.status = 'unknown'
                   and p.quota_window is not null and not p.quota_refunded
             returning p.appkey, p.quota_kind, p.quota_window
            )
            update quota_counters c
               set used = greatest(c.used - 1, 0)
              from r
             where c.appkey = r.appkey and c.kind = r.quota_kind
               and c.window_start = r.quota_window;

            if p_quota_kind is not null then
                v_used := umgw_take_slot(p_appkey, p_quota_kind, v_window, p_quota_limit);
                if v_used is null then
                    raise exception using errcode = 'UG001';
                end if;
            end if;
        exception
            when sqlstate 'UG001' then
                select q.used into v_used
                  from quota_counters q
                 where q.appkey = p_appkey and q.kind = p_quota_kind
                   and q.window_start = v_window;
                return query select 'rate_limited'::text, null::text, null::text,
                                    coalesce(v_used, 0), v_window, v_reset;
                return;
        end;
    end if;

    -- 3. The row, last.
    insert into pushes (id, app, appkey, platform, cast_type, task_class, production_mode,
                        client, out_biz_no, fingerprint, status, description, request,
                        quota_kind, quota_window, quota_limit)
    values (p_id, p_app, p_appkey, p_platform, p_cast_type, p_task_class, p_production_mode,
            p_client, p_out_biz_no, p_fingerprint, 'pending', p_description, p_request,
            p_quota_kind, v_window,
            case when p_quota_kind is null then null else p_quota_limit end);

    return query select 'admitted'::text, p_id, v_reclaim, v_used, v_window, v_reset;
end
$$;
