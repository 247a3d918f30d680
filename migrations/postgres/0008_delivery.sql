-- Asynchronous delivery: a push admitted with `Prefer: respond-async` (or `send_at`, or
-- `on_quota_exhausted: "wait"`) is stored in one of the gateway's waiting states and sent
-- later by a delivery worker on any replica, with retries:
--
--   awaiting_send     due at next_attempt_at (now, or a retry's backoff)
--   awaiting_send_at  held until its send_at
--   awaiting_quota    its bucket's window is full; due when the window ends
--   pending           a worker is sending it (deliver_lease_until); a replica that dies
--                     leaves it to the lease's end
--   withdrawn         cancelled locally before it was sent (final; Umeng never saw it)
--
-- None of these is one of Umeng's task states (queued, sending, scheduled, cancelled, ...).
-- `outbox` holds what the worker sends (the Umeng body and any file_lines to upload) until
-- the push is final. A deferred quota slot records its bucket (quota_kind, quota_limit,
-- quota_unit) with quota_window null until the slot is taken, when the push is sent.

alter table pushes
    add column delivery            text,         -- null: synchronous; 'async'
    add column outbox              jsonb,
    add column next_attempt_at     timestamptz,
    add column send_at             timestamptz,  -- when it goes out (send_at or start_time)
    add column deliver_by          timestamptz,  -- no attempt starts after this
    add column deliver_lease_until timestamptz,
    add column deliver_claims      integer not null default 0,  -- fencing token
    add column quota_wait          boolean not null default false,
    add column quota_unit          bigint;

create index pushes_due_idx on pushes (next_attempt_at, created_at, id)
    where status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota');
create index pushes_quota_wait_idx on pushes (appkey, quota_kind, created_at)
    where status = 'awaiting_quota';
create index pushes_delivering_idx on pushes (deliver_lease_until)
    where status = 'pending' and delivery is not null;

drop function umgw_admit(text, text, text, text, text, boolean, boolean, text, text, text,
                         jsonb, text, text, integer, bigint);

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
    p_quota_unit      bigint,   -- window length in seconds
    p_status          text,     -- pending (synchronous) or awaiting_send / awaiting_send_at
    p_defer_quota     boolean,  -- record the bucket, take the slot when the push is sent
    p_outbox          jsonb,    -- asynchronous: what the delivery worker sends
    p_send_at         timestamptz, -- when it goes out: send_at (held) or Umeng's start_time
    p_deliver_by      timestamptz, -- asynchronous: give up after
    p_quota_wait      boolean   -- asynchronous: wait for a free slot instead of failing
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
    v_delivery  text;
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

            select k.fingerprint, k.push_id, p.status, p.delivery
              into v_fp, v_owner, v_status, v_delivery
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
            elsif v_status = 'pending' and v_delivery is null then
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
        if p_quota_kind is not null and not p_defer_quota then
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

            if p_quota_kind is not null and not p_defer_quota then
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

    -- 3. The row, last. A deferred slot records its bucket without a window.
    insert into pushes (id, app, appkey, platform, cast_type, task_class, production_mode,
                        client, out_biz_no, fingerprint, status, description, request,
                        quota_kind, quota_window, quota_limit, quota_unit, delivery, outbox,
                        next_attempt_at, send_at, deliver_by, quota_wait)
    values (p_id, p_app, p_appkey, p_platform, p_cast_type, p_task_class, p_production_mode,
            p_client, p_out_biz_no, p_fingerprint, p_status, p_description, p_request,
            p_quota_kind,
            case when p_defer_quota then null else v_window end,
            case when p_quota_kind is null then null else p_quota_limit end,
            case when p_quota_kind is null then null else p_quota_unit end,
            case when p_status = 'pending' then null else 'async' end,
            p_outbox,
            case when p_status = 'pending' then null
                 when p_status = 'awaiting_send_at' then p_send_at else now() end,
            p_send_at, p_deliver_by, coalesce(p_quota_wait, false));

    return query select 'admitted'::text, p_id, v_reclaim, v_used, v_window, v_reset;
end
$$;

-- Claim up to p_limit due asynchronous pushes of the given apps (at most p_app_limits[i]
-- for app i), oldest due first, each leased for p_lease_ms. A push that needs its quota
-- slot takes it here, in the window of now, first come first served per bucket: behind an
-- older push of the bucket that waits for quota, it waits too; with a full window it waits
-- for the window's end (quota_wait, or a retry), or fails `quota_exhausted`. A push past
-- deliver_by fails instead of being claimed. Rows another replica is claiming are skipped.
create function umgw_claim_deliveries(
    p_limit      integer,
    p_lease_ms   bigint,
    p_apps       text[],
    p_appkeys    text[],
    p_app_limits integer[]
)
returns table (id text, claims integer, lease_until timestamptz)
language plpgsql
as $$
#variable_conflict use_column
declare
    r          record;
    v_taken    integer[] := array_fill(0, array[greatest(coalesce(array_length(p_apps, 1), 0), 1)]);
    v_idx      integer;
    v_claimed  integer := 0;
    v_epoch    double precision := extract(epoch from now());
    v_window   bigint;
    v_used     integer;
    v_head     timestamptz;
    v_wait     timestamptz;
begin
    for r in
        select p.id, p.app, p.status, p.appkey, p.quota_kind, p.quota_limit, p.quota_unit,
               p.quota_window, p.quota_refunded, p.quota_wait, p.deliver_by, p.created_at,
               p.deliver_claims
          from pushes p
         where p.status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')
           and p.next_attempt_at <= now()
           and (p.app, p.appkey) in (select a, k from unnest(p_apps, p_appkeys) as c(a, k))
         order by p.next_attempt_at, p.created_at, p.id
         limit greatest(p_limit, 1) * 4
           for update of p skip locked
    loop
        exit when v_claimed >= p_limit;
        v_idx := array_position(p_apps, r.app);
        continue when v_idx is null or v_taken[v_idx] >= p_app_limits[v_idx];

        if r.deliver_by is not null and r.deliver_by <= now() then
            with f as (
                update pushes p
                   set status = 'failed',
                       error_code = case when r.status = 'awaiting_quota'
                                         then 'quota_wait_expired' else 'delivery_expired' end,
                       error_msg = case when r.status = 'awaiting_quota'
                           then 'no quota slot came free before the push''s deadline'
                           else 'the push could not be sent before its deadline' end,
                       http_status = case when r.status = 'awaiting_quota' then 429 else 504 end,
                       quota_refunded = p.quota_refunded or p.quota_window is not null,
                       outbox = null, next_attempt_at = null,
                       finished_at = now(), updated_at = now()
                 where p.id = r.id
             returning p.appkey, p.quota_kind, p.quota_window, r.quota_refunded as was_refunded
            )
            update quota_counters c
               set used = greatest(c.used - 1, 0)
              from f
             where not f.was_refunded and f.quota_window is not null
               and c.appkey = f.appkey and c.kind = f.quota_kind
               and c.window_start = f.quota_window;
            continue;
        end if;

        if r.quota_kind is not null and (r.quota_window is null or r.quota_refunded) then
            v_window := (floor((v_epoch + 28800) / r.quota_unit) * r.quota_unit - 28800)::bigint;
            v_wait := least(to_timestamp(v_window + r.quota_unit), coalesce(r.deliver_by, 'infinity'));
            -- First come, first served: behind an older push waiting for this bucket.
            select min(q.next_attempt_at) into v_head
              from pushes q
             where q.status = 'awaiting_quota' and q.appkey = r.appkey
               and q.quota_kind = r.quota_kind
               and (q.created_at, q.id) < (r.created_at, r.id);
            if v_head is not null then
                v_used := null;
                v_wait := greatest(v_head, now());
            else
                v_used := umgw_take_slot(r.appkey, r.quota_kind, v_window, r.quota_limit);
            end if;
            if v_used is null then
                if r.quota_wait or r.deliver_claims > 0 then
                    update pushes p
                       set status = 'awaiting_quota', next_attempt_at = v_wait,
                           updated_at = now()
                     where p.id = r.id;
                else
                    update pushes p
                       set status = 'failed', error_code = 'quota_exhausted',
                           error_msg = 'the ' || r.quota_kind || ' quota window was full when the push was due',
                           http_status = 429, outbox = null, next_attempt_at = null,
                           finished_at = now(), updated_at = now()
                     where p.id = r.id;
                end if;
                continue;
            end if;
            update pushes p
               set quota_window = v_window, quota_refunded = false
             where p.id = r.id;
        end if;

        v_taken[v_idx] := v_taken[v_idx] + 1;
        v_claimed := v_claimed + 1;
        return query
            update pushes p
               set status = 'pending', deliver_claims = p.deliver_claims + 1,
                   deliver_lease_until = now() + p_lease_ms * interval '1 millisecond',
                   updated_at = now()
             where p.id = r.id
         returning p.id, p.deliver_claims, p.deliver_lease_until;
    end loop;
end
$$;

-- Local cancel (withdrawn) is a final state with an event, like the others.
create or replace trigger pushes_callback_event
    after update of status on pushes
    for each row
    when (new.callback_url is not null
          and new.status is distinct from old.status
          and new.status in ('accepted', 'failed', 'unknown', 'done', 'send_failed',
                             'cancelled', 'expired', 'no_match', 'task_lost', 'withdrawn'))
    execute function umgw_callback_event();
